//! HTTP/1.1 upgrades (RFC 9110, section 7.8), WebSocket above all: a client's request to switch
//! protocols goes upstream with its `Connection: upgrade` and `Upgrade` (hop-by-hop fields, so
//! removed from every request and added back on purpose, only for an upgrade the route allows),
//! the upstream's `101 Switching Protocols` goes back to the client, and from then on the
//! connection is a tunnel: bytes both ways, half-close passed on, until both sides are done, or
//! until no byte has passed either way for the idle timeout.
//!
//! `Upgrade: h2c` (RFC 7540's cleartext upgrade, retired by RFC 9113) is never passed on: the
//! request is served as HTTP/1.1, as RFC 9110 lets a server do with any upgrade, and as a client
//! that offers h2c expects (curl's `--http2` on an `http://` URL). Forwarding it would let a
//! client speak HTTP/2 to the upstream through a tunnel, past every route. Any other protocol
//! the route does not allow is refused with `403`, as Envoy does, so that a client (and its
//! operator) learns at once why its WebSocket does not open.
//!
//! Who does what: the service asks [`offer`] what a request asks for and how to send it
//! ([`forward`]), answers a refusal ([`refuse`]) or the `101` ([`switched`]), which leaves the
//! `Tunnel` in the connection's `Handoff` (`tunnel.rs`); the connection (`mod.rs`), once hyper
//! has written the `101` and given the socket back, runs it ([`run`]). A tunnel is like a
//! session of a tcp listener: cleartext, its bytes move by splice(2) (`relay`); under TLS,
//! through rustls.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, HeaderName, HeaderValue, UPGRADE};
use http::{HeaderMap, Response, StatusCode, Version, request};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use crate::cluster::{ClusterRequest, HostRequest};
use crate::config::ClusterRoute;
use crate::downstream::relay;
use crate::upstream::response::UpstreamBody;

use super::body::{Exchange, Flag, ResponseBody};
use super::ctx::ConnCtx;
use super::headers;
use super::io::ConnIo;
use super::local::local;
use super::tunnel::Tunnel;

static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Why an upgrade is refused (answered `403`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The route's `upgrades` does not name the protocol.
    NotAllowed,
    /// The cluster picked speaks HTTP/2, which cannot carry an HTTP/1.1 upgrade.
    Http2Cluster,
}

/// What a request asks for: `Ok(None)` for no upgrade (every request but an upgrade, at the cost
/// of one look at an empty extension map), `Ok(Some(protocols))` for the protocols to ask the
/// upstream for (those of the client's offer that the route allows, in the client's order), or
/// a refusal. An offer of `h2c` is dropped here, with its `HTTP2-Settings`.
pub fn offer(
    parts: &mut request::Parts,
    route: &ClusterRoute,
    http2_cluster: bool,
) -> Result<Option<HeaderValue>, Refusal> {
    // hyper marks an HTTP/1.1 request that carries `Upgrade` (and a CONNECT) with `OnUpgrade`:
    // the fields of any other request are not looked at.
    if parts
        .extensions
        .get::<hyper::upgrade::OnUpgrade>()
        .is_none()
    {
        return Ok(None);
    }
    offered(&mut parts.headers, &route.upgrades, http2_cluster)
}

/// [`offer`] on a request's fields.
fn offered(
    headers: &mut HeaderMap,
    upgrades: &[String],
    http2_cluster: bool,
) -> Result<Option<HeaderValue>, Refusal> {
    // An `Upgrade` that `Connection` does not name is no offer (RFC 9110, 7.8): it goes with the
    // other hop-by-hop fields.
    if !tokens(headers.get_all(CONNECTION)).any(|t| t.eq_ignore_ascii_case("upgrade")) {
        return Ok(None);
    }
    let mut allowed = String::new();
    let (mut refused, mut h2c) = (false, false);
    for protocol in tokens(headers.get_all(UPGRADE)) {
        let name = protocol.split('/').next().unwrap_or(protocol);
        if name.eq_ignore_ascii_case("h2c") {
            h2c = true;
        } else if !http2_cluster && allows(upgrades, protocol) {
            if !allowed.is_empty() {
                allowed.push_str(", ");
            }
            allowed.push_str(protocol);
        } else {
            refused = true;
        }
    }
    if h2c {
        headers.remove(&HTTP2_SETTINGS);
    }
    if !allowed.is_empty() {
        // Tokens of a field value that was valid: valid again.
        return Ok(HeaderValue::from_str(&allowed).ok());
    }
    match (refused, http2_cluster) {
        (false, _) => Ok(None),
        (true, false) => Err(Refusal::NotAllowed),
        (true, true) => Err(Refusal::Http2Cluster),
    }
}

/// Whether `protocol` (`name` or `name/version`, as a client offers it) is in the route's list:
/// named with its version, or by its name alone (any version).
fn allows(upgrades: &[String], protocol: &str) -> bool {
    let name = protocol.split('/').next().unwrap_or(protocol);
    upgrades.iter().any(|allowed| {
        allowed.eq_ignore_ascii_case(protocol)
            || (!allowed.contains('/') && allowed.eq_ignore_ascii_case(name))
    })
}

/// The items of comma-separated field values, trimmed, empty ones left out.
fn tokens<'a>(values: http::header::GetAll<'a, HeaderValue>) -> impl Iterator<Item = &'a str> + 'a {
    values
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Adds back the fields that ask the upstream for the upgrade, to a request whose hop-by-hop
/// fields are gone.
pub fn forward(headers: &mut HeaderMap, protocols: HeaderValue) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, protocols);
}

/// The answer to a refused upgrade: `403`, saying why, before anything goes upstream.
pub fn refuse(refusal: Refusal, exchange: Exchange) -> Response<ResponseBody> {
    let message = match refusal {
        Refusal::NotAllowed => {
            "upgrade refused: this route does not allow the protocol in Upgrade (see the route's `upgrades`)\n"
        }
        Refusal::Http2Cluster => {
            "upgrade refused: this route's cluster speaks HTTP/2, which cannot carry an HTTP/1.1 upgrade\n"
        }
    };
    local(StatusCode::FORBIDDEN, message, exchange, Flag::None)
}

/// What [`switched`] needs besides the upstream's answer.
pub struct Switch<'a> {
    /// The protocols the upstream was asked for.
    pub offered: Option<&'a HeaderValue>,
    /// The request's places in its cluster's and host's counts: a tunnel is a request in
    /// flight until it ends (circuit breakers, least request), as Envoy counts it.
    pub in_flight: (ClusterRequest, HostRequest),
    pub idle_timeout: Duration,
}

/// The client's `101`, from the upstream's: its fields, with `Connection: upgrade` and the
/// upstream's `Upgrade`; the tunnel waits in the connection's `Handoff` until hyper has sent it.
/// A `101` that switches to a protocol not asked for, or before the request body was all sent,
/// is answered `502`.
pub fn switched(
    ctx: &ConnCtx,
    response: Response<UpstreamBody>,
    switch: Switch<'_>,
    mut exchange: Exchange,
) -> Response<ResponseBody> {
    let (mut parts, body) = response.into_parts();
    let upgraded = match body {
        UpstreamBody::Http1(body) => body.into_upgraded(),
        UpstreamBody::Http2(_) => None,
    };
    let protocol = parts.headers.get(UPGRADE).cloned();
    let asked = protocol
        .as_ref()
        .and_then(|p| p.to_str().ok())
        .is_some_and(|p| {
            switch
                .offered
                .and_then(|offered| offered.to_str().ok())
                .is_some_and(|offered| offered.split(',').any(|o| o.trim().eq_ignore_ascii_case(p)))
        });
    let (Some(upstream), Some(protocol), true) = (upgraded, protocol, asked) else {
        debug!(
            worker = ctx.worker.id,
            "upstream answered 101 without switching to a protocol asked for (or before the request body was sent)"
        );
        return local(
            StatusCode::BAD_GATEWAY,
            "upstream switched protocols in an invalid way\n",
            exchange,
            Flag::UpstreamProtocolError,
        );
    };
    headers::prepare_response(&mut parts, Version::HTTP_11);
    // A 101 has no body (RFC 9110, 15.2): a length would mislead the client.
    parts.headers.remove(CONTENT_LENGTH);
    parts
        .headers
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    parts.headers.insert(UPGRADE, protocol);
    exchange.set_status(StatusCode::SWITCHING_PROTOCOLS.as_u16());
    let (log, started) = exchange.take_log();
    ctx.handoff.put(Box::new(Tunnel {
        worker: ctx.worker.clone(),
        listener: ctx.listener,
        upstream,
        _in_flight: switch.in_flight,
        idle_timeout: switch.idle_timeout,
        started,
        log,
        to_client: Cell::new(0),
        from_client: Cell::new(0),
        flag: Flag::None,
        active: false,
    }));
    Response::from_parts(parts, ResponseBody::full(Bytes::new(), exchange))
}

/// A client's stream as a tunnel uses it.
pub trait Downstream: AsyncRead + AsyncWrite + Unpin {
    /// Takes the bytes read from the client but not served yet (besides hyper's own).
    fn take_unread(&mut self) -> Bytes;
    /// The client's socket, when nothing stands between it and the client's bytes (cleartext):
    /// the tunnel then splices.
    fn socket(&self) -> Option<&TcpStream>;
}

impl Downstream for ConnIo<TcpStream> {
    fn take_unread(&mut self) -> Bytes {
        self.take_prefix()
    }

    fn socket(&self) -> Option<&TcpStream> {
        Some(self.get_ref())
    }
}

impl Downstream for tokio_rustls::server::TlsStream<ConnIo<TcpStream>> {
    fn take_unread(&mut self) -> Bytes {
        // rustls keeps what it decrypted and the tunnel reads through it.
        Bytes::new()
    }

    fn socket(&self) -> Option<&TcpStream> {
        None
    }
}

/// Runs the tunnel between `client` (hyper has sent it the `101`; `unread` is what hyper read
/// after the request) and the upstream, until both directions have ended, either side fails,
/// or nothing passed for the idle timeout.
pub async fn run<S: Downstream>(mut tunnel: Box<Tunnel>, mut client: S, unread: Bytes) {
    let worker = tunnel.worker.clone();
    let stats = &worker.stats;
    let ids = &stats.ids.listeners[tunnel.listener];
    stats.shard.inc(ids.downstream_cx_upgrades_total);
    stats.shard.gauge_add(ids.downstream_cx_upgrades_active, 1);
    tunnel.active = true;
    let last = Cell::new(Instant::now());
    let t = &mut *tunnel;
    let (upstream, to_client, from_client) = (&mut t.upstream, &t.to_client, &t.from_client);
    let relayed = async {
        // What came before the tunnel began: the client's bytes after its request, and the
        // upstream's after its 101.
        let more = client.take_unread();
        let early = if more.is_empty() {
            unread
        } else {
            [unread, more].concat().into()
        };
        let upstream_early = std::mem::take(&mut upstream.read);
        let to_upstream = async {
            upstream.stream.write_all(&early).await?;
            from_client.set(early.len() as u64);
            Ok::<_, io::Error>(())
        };
        let to_the_client = async {
            client.write_all(&upstream_early).await?;
            client.flush().await?;
            to_client.set(upstream_early.len() as u64);
            Ok::<_, io::Error>(())
        };
        tokio::try_join!(to_upstream, to_the_client)?;
        last.set(Instant::now());
        let seen = |count: &Cell<u64>, n: u64| {
            count.set(count.get() + n);
            last.set(Instant::now());
        };
        match client.socket() {
            Some(socket) => {
                // The bytes go around the connection's own counting: counted here, as a tcp
                // listener's are.
                relay::relay(
                    socket,
                    &upstream.stream,
                    |n| {
                        seen(from_client, n);
                        stats.shard.add(ids.downstream_cx_rx_bytes_total, n);
                    },
                    |n| {
                        seen(to_client, n);
                        stats.shard.add(ids.downstream_cx_tx_bytes_total, n);
                    },
                )
                .await
            }
            None => {
                // Under TLS the connection counts its bytes on the wire itself.
                let mut metered = Metered {
                    stream: &mut upstream.stream,
                    seen: &seen,
                    to_client,
                    from_client,
                };
                tokio::io::copy_bidirectional(&mut client, &mut metered)
                    .await
                    .map(|_| ())
            }
        }
    };
    let timeout = t.idle_timeout;
    let idle = async {
        loop {
            let due = last.get() + timeout;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due.into()).await;
        }
    };
    let ended = tokio::select! {
        relayed = relayed => Some(relayed),
        () = idle => None,
    };
    match ended {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            debug!(worker = worker.id, "tunnel ended: {e}");
            t.flag = Flag::UpstreamReset;
        }
        None => {
            debug!(
                worker = worker.id,
                ?timeout,
                "tunnel idle past its timeout; closing"
            );
            stats.shard.inc(ids.downstream_cx_upgrades_idle_timeout);
            t.flag = Flag::StreamIdleTimeout;
        }
    }
}

/// The upstream's socket under a TLS client's tunnel: counts what passes, each way, and when.
struct Metered<'a, F: Fn(&Cell<u64>, u64)> {
    stream: &'a mut TcpStream,
    seen: &'a F,
    to_client: &'a Cell<u64>,
    from_client: &'a Cell<u64>,
}

impl<F: Fn(&Cell<u64>, u64)> AsyncRead for Metered<'_, F> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut *self.stream).poll_read(cx, buf))?;
        let n = buf.filled().len() - before;
        if n > 0 {
            (self.seen)(self.to_client, n as u64);
        }
        Poll::Ready(Ok(()))
    }
}

impl<F: Fn(&Cell<u64>, u64)> AsyncWrite for Metered<'_, F> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut *self.stream).poll_write(cx, buf))?;
        (self.seen)(self.from_client, n as u64);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_protocol_is_allowed_by_name_or_with_its_version() {
        let list = vec!["websocket".to_owned(), "foo/2".to_owned()];
        assert!(allows(&list, "websocket"));
        assert!(allows(&list, "WebSocket"));
        assert!(allows(&list, "websocket/13"));
        assert!(allows(&list, "foo/2"));
        assert!(!allows(&list, "foo"));
        assert!(!allows(&list, "foo/3"));
        assert!(!allows(&list, "h2c"));
    }

    fn fields(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|&(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn offers_are_read_from_connection_and_upgrade() {
        let ws = vec!["websocket".to_owned()];
        let mut headers = fields(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(
            offered(&mut headers, &ws, false),
            Ok(Some(HeaderValue::from_static("websocket")))
        );
        // Without the `upgrade` connection option, `Upgrade` is no offer.
        let mut headers = fields(&[("upgrade", "websocket")]);
        assert_eq!(offered(&mut headers, &ws, false), Ok(None));
        // Only what the route allows is asked for, in the client's order.
        let mut headers = fields(&[
            ("connection", "upgrade"),
            ("upgrade", "foo, websocket/13, bar"),
        ]);
        assert_eq!(
            offered(&mut headers, &ws, false),
            Ok(Some(HeaderValue::from_static("websocket/13")))
        );
        let mut headers = fields(&[("connection", "upgrade"), ("upgrade", "foo")]);
        assert_eq!(offered(&mut headers, &ws, false), Err(Refusal::NotAllowed));
        let mut headers = fields(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        assert_eq!(offered(&mut headers, &[], false), Err(Refusal::NotAllowed));
        assert_eq!(offered(&mut headers, &ws, true), Err(Refusal::Http2Cluster));
    }

    #[test]
    fn h2c_is_ignored_and_its_settings_go() {
        let ws = vec!["websocket".to_owned()];
        let mut headers = fields(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
        ]);
        assert_eq!(offered(&mut headers, &ws, false), Ok(None));
        assert!(!headers.contains_key("http2-settings"));
        // Offered beside another protocol, h2c is left out of what is asked.
        let mut headers = fields(&[("connection", "upgrade"), ("upgrade", "h2c, websocket")]);
        assert_eq!(
            offered(&mut headers, &ws, false),
            Ok(Some(HeaderValue::from_static("websocket")))
        );
    }
}
