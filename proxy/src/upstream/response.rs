//! An upstream's response as the downstream side holds it: its body, from an HTTP/1.1
//! connection or an HTTP/2 stream, and the connection, given back to its pool once the body has
//! ended cleanly.

use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::pool::ClusterPool;
use super::{h1, h2};

/// What a response holds of its upstream connection.
pub enum Upstream {
    /// An HTTP/1.1 connection (read by the body, [`UpstreamBody::Http1`]), given back to its
    /// pool once the response is complete.
    Http1 {
        pool: Rc<ClusterPool>,
        endpoint: SocketAddr,
    },
    /// A stream of a shared HTTP/2 connection: nothing goes back, the stream just ends.
    Http2(#[expect(dead_code, reason = "held for its drop, which ends the stream")] h2::Stream),
}

impl Upstream {
    /// Gives an HTTP/1.1 connection back to its pool if `body`, the response read from it,
    /// ended cleanly and the connection may carry another request; an HTTP/2 stream just ends.
    #[inline]
    pub fn release(self, body: &mut UpstreamBody) {
        if let (Upstream::Http1 { pool, endpoint }, UpstreamBody::Http1(body)) = (self, body)
            && let Some(conn) = body.reusable()
        {
            pool.release(endpoint, conn);
        }
    }
}

/// A response body as it comes from an upstream.
pub enum UpstreamBody {
    Http1(h1::Body),
    Http2(Incoming),
}

/// What an upstream's response body can fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Http1(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            UpstreamBody::Http2(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Http1(body) => body.is_end_stream(),
            UpstreamBody::Http2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Http1(body) => body.size_hint(),
            UpstreamBody::Http2(body) => body.size_hint(),
        }
    }
}
