use std::time::Duration;

use baton_tests::proxy::Proxy;
use baton_tests::upstream::{TcpEcho, pattern};
use baton_tests::{baton_stats, free_addr, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::WAIT;

fn tcp_config(listen: std::net::SocketAddr, upstream: std::net::SocketAddr) -> String {
    format!(
        r#"
[[listener]]
name = "l4"
address = "{listen}"
protocol = "tcp"
cluster = "echo"
access_log = "tcp.log"

[[cluster]]
name = "echo"
endpoints = ["{upstream}"]
connect_timeout = "2s"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_bytes_both_ways_and_passes_half_close_on() {
    let echo = TcpEcho::start().await;
    let listen = free_addr();
    let proxy = Proxy::start(&tcp_config(listen, echo.addr));

    let stream = TcpStream::connect(listen).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let sent: Vec<u8> = (0..(1 << 20) + 17).map(pattern).collect();
    let to_send = sent.clone();
    let writer = tokio::spawn(async move {
        write.write_all(&to_send).await.unwrap();
        // Half-close: the client is done sending but still reads the echo.
        write.shutdown().await.unwrap();
        write
    });
    let mut received = Vec::new();
    tokio::time::timeout(WAIT, read.read_to_end(&mut received))
        .await
        .expect("the echo ends once the upstream closes its half")
        .unwrap();
    let _write = writer.await.unwrap();
    assert_eq!(received.len(), sent.len());
    assert!(received == sent, "every byte comes back in order");

    assert!(proxy.wait_for_log_file(
        "tcp.log",
        &format!(" {} - sent={}", echo.addr, sent.len()),
        WAIT
    ));
    assert!(
        proxy
            .read_file("tcp.log")
            .contains(&format!("\"TCP\" - {} ", sent.len()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_a_sessions_bytes_while_it_runs() {
    let echo = TcpEcho::start().await;
    let listen = free_addr();
    let proxy = Proxy::start(&tcp_config(listen, echo.addr));
    let region = proxy.dir().join("stats.shm");

    let stream = TcpStream::connect(listen).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let sent: Vec<u8> = (0..300_000).map(pattern).collect();
    let mut received = vec![0u8; sent.len()];
    let (wrote, echoed) = tokio::join!(
        write.write_all(&sent),
        tokio::time::timeout(WAIT, read.read_exact(&mut received))
    );
    wrote.unwrap();
    echoed.expect("the echo comes back").unwrap();
    assert!(received == sent);

    // The session is still open: its bytes are counted already, both ways.
    let counted = |name: &str| {
        let (code, out, err) = baton_stats(&["--path", region.to_str().unwrap()]);
        assert_eq!(code, Some(0), "{err}");
        out.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(": ")?
                .parse::<u64>()
                .ok()
        })
    };
    let rx = "downstream_cx_rx_bytes_total{listener=l4}";
    let tx = "downstream_cx_tx_bytes_total{listener=l4}";
    assert!(
        wait_until(WAIT, || counted(rx) == Some(sent.len() as u64)
            && counted(tx) == Some(sent.len() as u64)),
        "rx {:?}, tx {:?}",
        counted(rx),
        counted(tx)
    );
    drop(write);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_the_client_when_the_upstream_is_down() {
    let dead = free_addr();
    let listen = free_addr();
    let proxy = Proxy::start(&tcp_config(listen, dead));
    let mut stream = TcpStream::connect(listen).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("the proxy closes the connection instead of hanging");
    assert!(matches!(read, Ok(0) | Err(_)));
    assert!(proxy.wait_for_log_file("tcp.log", &format!(" {dead} UF "), WAIT));
}
