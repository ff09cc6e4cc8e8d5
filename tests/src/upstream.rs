//! Real servers for the proxy to talk to: an HTTP origin (HTTP/1.1, or HTTP/2 with prior
//! knowledge) with a few behaviours chosen by path, and a TCP echo server. The gRPC server is in
//! [`crate::grpc`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

use crate::listen_on_free_port;

/// How long `/gate/<k>` waits for the others before giving up.
const GATE_TIMEOUT: Duration = Duration::from_secs(15);

/// An HTTP origin on loopback, HTTP/1.1 ([`Origin::start`]) or HTTP/2 ([`Origin::start_h2`]).
/// Paths:
/// - `/headers`: the request as JSON (`method`, `uri`, `version`, `headers`);
/// - `/echo...`: the request body back, streamed;
/// - `/collect`: reads the whole request body, then answers `received <n> bytes`;
/// - `/slow/<ms>`: answers after `ms` milliseconds;
/// - `/bytes/<n>`: `n` bytes of a known pattern ([`pattern`]), with a content length;
/// - `/chunked/<n>`: `n` chunks, streamed without a content length;
/// - `/gate/<k>`: answers `gate open` once `k` requests are waiting at the gate at once (so `k`
///   answers prove `k` requests in flight together), or 503 after 15 s;
/// - anything else: `upstream <name>`, with the request's target (path and query, or the
///   whole URI of an HTTP/2 request) as it arrived in `x-upstream-uri`.
pub struct Origin {
    pub addr: SocketAddr,
    /// Requests received.
    pub requests: Arc<AtomicUsize>,
    /// TCP connections accepted.
    pub connections: Arc<AtomicUsize>,
    /// When not 0: every answer has this status (an origin that fails).
    status: Arc<AtomicU16>,
    /// When set, `/healthz` answers 503 (and everything else as usual).
    health_failing: Arc<AtomicBool>,
    /// Set to close the listener and every connection at once (an origin that dies).
    killed: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// What the handlers of one origin share.
struct Shared {
    name: Arc<str>,
    /// Requests that have come to `/gate/<k>`.
    at_gate: AtomicUsize,
    gate: Notify,
}

impl Origin {
    pub async fn start(name: &str) -> Origin {
        Self::serve(name, listen_on_free_port(), false)
    }

    /// An origin on `addr` (to bring one back where it was, or on another loopback address).
    pub async fn start_at(name: &str, addr: SocketAddr) -> Origin {
        let listener = TcpListener::bind(addr)
            .await
            .expect("the origin can listen");
        Self::serve(name, listener, false)
    }

    /// An origin that speaks HTTP/2 with prior knowledge (h2c) only.
    pub async fn start_h2(name: &str) -> Origin {
        Self::serve(name, listen_on_free_port(), true)
    }

    fn serve(name: &str, listener: TcpListener, h2: bool) -> Origin {
        let addr = listener.local_addr().expect("a listener has an address");
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let status = Arc::new(AtomicU16::new(0));
        let health_failing = Arc::new(AtomicBool::new(false));
        let (killed, on_kill) = watch::channel(false);
        let shared = Arc::new(Shared {
            name: name.into(),
            at_gate: AtomicUsize::new(0),
            gate: Notify::new(),
        });
        let (r, c, st, hf) = (
            requests.clone(),
            connections.clone(),
            status.clone(),
            health_failing.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (r, shared, st, hf) = (r.clone(), shared.clone(), st.clone(), hf.clone());
                let mut on_kill = on_kill.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        r.fetch_add(1, Ordering::SeqCst);
                        let mut status = st.load(Ordering::SeqCst);
                        if request.uri().path() == "/healthz" && hf.load(Ordering::SeqCst) {
                            status = 503;
                        }
                        let shared = shared.clone();
                        async move {
                            match StatusCode::from_u16(status) {
                                Ok(status) => {
                                    Ok(full(status, format!("upstream {} failing\n", shared.name)))
                                }
                                Err(_) => handle(shared, request).await,
                            }
                        }
                    });
                    let io = TokioIo::new(stream);
                    let serve = async {
                        if h2 {
                            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, service)
                                .await;
                        } else {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, service)
                                .await;
                        }
                    };
                    tokio::select! {
                        _ = serve => {}
                        _ = on_kill.wait_for(|k| *k) => {}
                    }
                });
            }
        });
        Origin {
            addr,
            requests,
            connections,
            status,
            health_failing,
            killed,
            task,
        }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Makes `/healthz` answer 503 (or normally again), and nothing else.
    pub fn fail_health(&self, failing: bool) {
        self.health_failing.store(failing, Ordering::SeqCst);
    }

    /// Makes every answer `status` (`None`: answer normally again).
    pub fn fail_with(&self, status: Option<u16>) {
        self.status.store(status.unwrap_or(0), Ordering::SeqCst);
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        // Dropping the accept task closes the listener; the flag closes every connection.
        self.task.abort();
        let _ = self.killed.send(true);
    }
}

/// The byte at `index` of a `/bytes/<n>` body.
pub fn pattern(index: usize) -> u8 {
    (index % 251) as u8
}

type OriginBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<OriginBody>, Infallible> {
    let name = &shared.name;
    let path = request.uri().path().to_owned();
    let number = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|n| n.parse::<usize>().ok())
    };
    let response = if path == "/headers" {
        let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, value) in request.headers() {
            headers
                .entry(name.to_string())
                .or_default()
                .push(value.to_str().unwrap_or("<binary>").to_owned());
        }
        let body = serde_json::json!({
            "method": request.method().as_str(),
            "uri": request.uri().to_string(),
            "version": format!("{:?}", request.version()),
            "headers": headers,
        });
        full(StatusCode::OK, body.to_string())
    } else if path.starts_with("/echo") {
        let mut response = Response::new(request.into_body().boxed());
        response
            .headers_mut()
            .insert("x-echo", "1".parse().unwrap());
        response
    } else if path == "/collect" {
        match request.into_body().collect().await {
            Ok(body) => full(
                StatusCode::OK,
                format!("received {} bytes\n", body.to_bytes().len()),
            ),
            Err(e) => full(StatusCode::BAD_REQUEST, format!("body failed: {e}\n")),
        }
    } else if let Some(ms) = number("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms as u64)).await;
        full(StatusCode::OK, "slow done\n".into())
    } else if let Some(k) = number("/gate/") {
        let gate = async {
            shared.at_gate.fetch_add(1, Ordering::SeqCst);
            shared.gate.notify_waiters();
            loop {
                let opened = shared.gate.notified();
                if shared.at_gate.load(Ordering::SeqCst) >= k {
                    return;
                }
                opened.await;
            }
        };
        match tokio::time::timeout(GATE_TIMEOUT, gate).await {
            Ok(()) => full(StatusCode::OK, "gate open\n".into()),
            Err(_) => full(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("gate timed out: fewer than {k} requests came at once\n"),
            ),
        }
    } else if let Some(n) = number("/bytes/") {
        let body: Vec<u8> = (0..n).map(pattern).collect();
        Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed())
    } else if let Some(n) = number("/chunked/") {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            for i in 0..n {
                if tx.send(Bytes::from(format!("chunk {i}\n"))).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        });
        Response::new(ChannelBody(rx).boxed())
    } else {
        let uri = request.uri().to_string();
        let mut response = full(StatusCode::OK, format!("upstream {name}\n"));
        let headers = response.headers_mut();
        headers.insert("x-upstream-name", name.parse().unwrap());
        if let Ok(uri) = uri.parse() {
            headers.insert("x-upstream-uri", uri);
        }
        response
    };
    Ok(response)
}

fn full(status: StatusCode, body: String) -> Response<OriginBody> {
    let mut response = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *response.status_mut() = status;
    response
}

/// A body fed by a channel: sent as chunks, with no length known in advance.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// A TCP server that echoes what it reads and, when the client shuts down its sending half,
/// shuts down its own after echoing the rest (so a proxy's half-close can be checked).
pub struct TcpEcho {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TcpEcho {
    pub async fn start() -> TcpEcho {
        let listener = listen_on_free_port();
        let addr = listener.local_addr().expect("a listener has an address");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = stream.shutdown().await;
                });
            }
        });
        TcpEcho { addr, task }
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}
