//! HTTP clients for the tests: HTTP/1.1 and HTTP/2 (prior knowledge or over TLS), each on a
//! connection the test controls.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A response read to its end.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The trailers that ended the body, if any came.
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body parsed as JSON (what the origin's `/headers` returns).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// A request for `path` with a `Host` header naming `host`.
pub fn request(
    method: &str,
    host: &str,
    path: &str,
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(Full::new(body.into()))
        .expect("a valid request")
}

/// One HTTP/1.1 connection.
pub struct H1 {
    sender: http1::SendRequest<Full<Bytes>>,
}

impl H1 {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<H1> {
        let stream = TcpStream::connect(addr).await?;
        Ok(Self::handshake(stream).await)
    }

    pub async fn handshake<S>(io: S) -> H1
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = http1::handshake(TokioIo::new(io))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(connection);
        H1 { sender }
    }

    pub async fn send(&mut self, request: Request<Full<Bytes>>) -> Result<Reply, hyper::Error> {
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        read(response).await
    }

    pub async fn get(&mut self, path: &str) -> Result<Reply, hyper::Error> {
        self.send(request("GET", "test.local", path, Bytes::new()))
            .await
    }

    /// Whether the server has closed the connection (as seen by the client).
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// One HTTP/2 connection.
#[derive(Clone)]
pub struct H2 {
    sender: http2::SendRequest<Full<Bytes>>,
}

impl H2 {
    /// Cleartext HTTP/2 with prior knowledge.
    pub async fn connect(addr: SocketAddr) -> std::io::Result<H2> {
        let stream = TcpStream::connect(addr).await?;
        Ok(Self::handshake(stream).await)
    }

    pub async fn handshake<S>(io: S) -> H2
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        H2 { sender }
    }

    pub async fn send(&mut self, request: Request<Full<Bytes>>) -> Result<Reply, hyper::Error> {
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        read(response).await
    }

    /// A GET for `path` on `authority`, as an HTTP/2 request carries it (`:authority`).
    pub async fn get(&mut self, authority: &str, path: &str) -> Result<Reply, hyper::Error> {
        let request = Request::get(format!("http://{authority}{path}"))
            .body(Full::new(Bytes::new()))
            .expect("a valid request");
        self.send(request).await
    }

    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

async fn read(response: http::Response<hyper::body::Incoming>) -> Result<Reply, hyper::Error> {
    let (parts, body) = response.into_parts();
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned();
    Ok(Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    })
}

/// A GET on a new HTTP/1.1 connection.
pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    H1::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
        .get(path)
        .await
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
}

/// A GET on a new HTTP/1.1 connection, or why it failed (refused, reset, closed).
pub async fn try_get(addr: SocketAddr, path: &str) -> Result<Reply, String> {
    let mut h1 = H1::connect(addr)
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    h1.get(path)
        .await
        .map_err(|e| format!("GET {path} on {addr}: {e}"))
}
