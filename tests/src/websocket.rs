//! WebSocket, end to end: an echo server and a client, both tokio-tungstenite, so that what
//! passes through the proxy is checked by a real implementation of RFC 6455 on each side.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use http::HeaderMap;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request, Response as Accepted,
};
use tokio_tungstenite::tungstenite::{Error, Message};
use tokio_tungstenite::{WebSocketStream, accept_hdr_async, client_async};

use crate::free_addr;

/// A WebSocket server on loopback that echoes every text and binary message (and answers pings,
/// and closes, as the protocol says). Paths:
/// - `/refuse`: the handshake is refused with `403` and a body;
/// - `/greet`: the server sends `hello` as soon as the handshake is done, before any message;
/// - anything else: echo.
pub struct WsEcho {
    pub addr: SocketAddr,
    /// Connections accepted.
    connections: Arc<AtomicUsize>,
    /// The fields of every handshake request, in order.
    handshakes: Arc<Mutex<Vec<HeaderMap>>>,
    task: JoinHandle<()>,
}

impl WsEcho {
    pub async fn start() -> WsEcho {
        let listener = TcpListener::bind(free_addr())
            .await
            .expect("the WebSocket server can listen");
        let addr = listener.local_addr().expect("a local address");
        let connections = Arc::new(AtomicUsize::new(0));
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (connections.clone(), handshakes.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, seen.clone()));
            }
        });
        WsEcho {
            addr,
            connections,
            handshakes,
            task,
        }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// The fields of the last handshake request received.
    pub fn last_handshake(&self) -> HeaderMap {
        self.handshakes
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for WsEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(stream: TcpStream, seen: Arc<Mutex<Vec<HeaderMap>>>) {
    let mut path = String::new();
    #[allow(clippy::result_large_err)] // The callback's type is tungstenite's.
    let callback = |request: &Request, response: Accepted| {
        seen.lock().unwrap().push(request.headers().clone());
        path = request.uri().path().to_owned();
        if path == "/refuse" {
            let mut refusal = ErrorResponse::new(Some("no WebSocket here\n".to_owned()));
            *refusal.status_mut() = http::StatusCode::FORBIDDEN;
            return Err(refusal);
        }
        Ok(response)
    };
    let Ok(mut ws) = accept_hdr_async(stream, callback).await else {
        return;
    };
    if path == "/greet" && ws.send(Message::text("hello")).await.is_err() {
        return;
    }
    while let Some(Ok(message)) = ws.next().await {
        let sent = match message {
            Message::Text(_) | Message::Binary(_) => ws.send(message).await,
            // tungstenite queues the pong (and the answer to a close); this sends it.
            Message::Ping(_) | Message::Close(_) => ws.flush().await,
            Message::Pong(_) | Message::Frame(_) => Ok(()),
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Opens a WebSocket to `ws://<host><path>` over `stream` (a connection to the proxy).
pub async fn handshake<S>(
    stream: S,
    host: &str,
    path: &str,
) -> Result<(WebSocketStream<S>, Response), Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    client_async(format!("ws://{host}{path}"), stream).await
}

/// Opens a WebSocket to `ws://app.test<path>` on a new connection to `addr`; panics if the
/// handshake fails.
pub async fn connect(addr: SocketAddr, path: &str) -> (WebSocketStream<TcpStream>, Response) {
    let stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    handshake(stream, "app.test", path)
        .await
        .unwrap_or_else(|e| panic!("WebSocket handshake with {addr}{path}: {e}"))
}

/// Sends `message` and returns the next data message (text or binary) or pong that comes back.
pub async fn round_trip<S>(ws: &mut WebSocketStream<S>, message: Message) -> Message
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(message).await.expect("the message can be sent");
    next_message(ws).await
}

/// The next text, binary, pong or close message; panics when the connection ends first.
pub async fn next_message<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(Message::Ping(_) | Message::Frame(_))) => continue,
            Some(Ok(message)) => return message,
            Some(Err(e)) => panic!("the WebSocket failed: {e}"),
            None => panic!("the WebSocket ended"),
        }
    }
}
