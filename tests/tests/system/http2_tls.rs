use baton_tests::client::{H1, H2, request};
use baton_tests::free_addr;
use baton_tests::proxy::Proxy;
use baton_tests::tls::{self, TestCa};
use baton_tests::upstream::Origin;
use http::Version;

use crate::http_config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_prior_knowledge_multiplexes_streams() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let _proxy = Proxy::start(&http_config(listen, admin, origin.addr));
    let h2 = H2::connect(listen).await.unwrap();

    let mut streams = Vec::new();
    for i in 0..20 {
        let mut h2 = h2.clone();
        // Slow and fast requests at once on one connection: each stream answers on its own.
        let path = if i % 2 == 0 {
            "/slow/200".to_owned()
        } else {
            format!("/fast/{i}")
        };
        streams.push(tokio::spawn(async move { h2.get("app.test", &path).await }));
    }
    for stream in streams {
        let r = stream.await.unwrap().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.version, Version::HTTP_2);
    }
    assert_eq!(origin.requests(), 20);

    let mut h2 = h2.clone();
    let r = h2.get("app.test:9", "/headers").await.unwrap();
    let seen = r.json();
    assert_eq!(
        seen["headers"]["host"][0], "app.test:9",
        ":authority becomes Host upstream"
    );
    assert_eq!(seen["headers"]["via"][0], "2 baton");
    assert_eq!(seen["version"], "HTTP/1.1");
    let r = h2.get("direct.test", "/").await.unwrap();
    assert_eq!(r.status, 201, "direct responses over HTTP/2 too");
    assert_eq!(r.text(), "direct\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_negotiates_alpn_and_picks_certificates_by_sni() {
    let origin = Origin::start("origin").await;
    let ca = TestCa::new();
    let first = ca.leaf(&["a.test"]);
    let wildcard = ca.leaf(&["*.b.test"]);
    let listen = free_addr();
    let config = format!(
        r#"
[[listener]]
name = "tls"
address = "{listen}"
protocol = "http"

[[listener.tls.certificate]]
cert = "a.pem"
key = "a.key"

[[listener.tls.certificate]]
cert = "b.pem"
key = "b.key"

[[listener.route]]
cluster = "origin"

[[cluster]]
name = "origin"
endpoints = ["{}"]
"#,
        origin.addr
    );
    // The config names its files relative to its own folder.
    let proxy = Proxy::start_with_files(
        &config,
        &[
            ("a.pem", &first.cert_pem),
            ("a.key", &first.key_pem),
            ("b.pem", &wildcard.cert_pem),
            ("b.key", &wildcard.key_pem),
        ],
    );

    // ALPN h2.
    let both = ca.client_config(&[b"h2", b"http/1.1"]);
    let stream = tls::connect(listen, both.clone(), "a.test").await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(peer_cert(&stream), first.der);
    let mut h2 = H2::handshake(stream).await;
    let r = h2.get("a.test", "/headers").await.unwrap();
    assert_eq!(r.version, Version::HTTP_2);
    assert_eq!(r.json()["headers"]["x-forwarded-proto"][0], "https");

    // SNI picks the wildcard certificate; ALPN http/1.1.
    let h1_only = ca.client_config(&[b"http/1.1"]);
    let stream = tls::connect(listen, h1_only, "api.b.test").await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(peer_cert(&stream), wildcard.der);
    let mut h1 = H1::handshake(stream).await;
    let r = h1
        .send(request("GET", "api.b.test", "/headers", ""))
        .await
        .unwrap();
    assert_eq!(r.version, Version::HTTP_11);
    assert_eq!(r.json()["headers"]["x-forwarded-proto"][0], "https");

    // A name no certificate has gets the first one, which the client then rejects.
    let err = tls::connect(listen, both, "c.test").await.unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
    drop(proxy);
}

fn peer_cert(stream: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}
