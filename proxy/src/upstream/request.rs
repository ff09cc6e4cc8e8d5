//! A client's request body on its way upstream: its progress (for the request timeout, which
//! starts when the upload is done) and `max_request_body`.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// The body of a request sent upstream: the client's as it streams in, or one kept in memory
/// (empty, or buffered to be sent again by a retry or copied by a mirror).
pub type RequestBody = Either<TrackedBody, Full<Bytes>>;

/// How far a client's request body has come: when it last moved, and when it ended.
pub struct BodyProgress {
    last: Cell<Instant>,
    ended: Cell<Option<Instant>>,
    changed: tokio::sync::Notify,
    /// Set when the body went past the listener's `max_request_body`.
    too_large: Cell<bool>,
}

impl BodyProgress {
    pub fn new(already_ended: bool) -> Rc<Self> {
        let now = Instant::now();
        Rc::new(BodyProgress {
            last: Cell::new(now),
            ended: Cell::new(already_ended.then_some(now)),
            changed: tokio::sync::Notify::new(),
            too_large: Cell::new(false),
        })
    }

    /// Whether the body was cut off for going past `max_request_body`.
    pub fn too_large(&self) -> bool {
        self.too_large.get()
    }

    /// When the body ended; waits for it.
    pub async fn ended(&self) -> Instant {
        loop {
            if let Some(ended) = self.ended.get() {
                return ended;
            }
            self.changed.notified().await;
        }
    }

    fn end(&self) {
        if self.ended.get().is_none() {
            self.ended.set(Some(Instant::now()));
            self.changed.notify_waiters();
        }
    }

    /// Resolves when the request has taken too long: `Response` when the upstream has not
    /// answered within `response_timeout` of the end of the request body, `Body` when the body
    /// has not moved for `idle_timeout`.
    pub async fn timed_out(
        &self,
        response_timeout: Duration,
        idle_timeout: Duration,
    ) -> RequestTimeout {
        loop {
            if let Some(ended) = self.ended.get() {
                tokio::time::sleep_until((ended + response_timeout).into()).await;
                return RequestTimeout::Response;
            }
            let last = self.last.get();
            tokio::select! {
                _ = tokio::time::sleep_until((last + idle_timeout).into()) => {
                    if self.ended.get().is_none() && self.last.get() == last {
                        return RequestTimeout::Body;
                    }
                }
                _ = self.changed.notified() => {}
            }
        }
    }
}

/// Which timeout a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestTimeout {
    /// The upstream did not answer in time.
    Response,
    /// The client stopped sending its body.
    Body,
}

/// The client's request body on its way upstream, reporting its progress, so that the request
/// timeout starts when the upload is done (a slow upload is not a slow upstream), and cut off
/// past the listener's `max_request_body`.
pub struct TrackedBody {
    inner: Incoming,
    progress: Rc<BodyProgress>,
    /// Bytes the body may still bring.
    allowed: u64,
}

/// A request body went past `max_request_body`.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than max_request_body")]
pub struct BodyTooLarge;

impl TrackedBody {
    pub fn new(inner: Incoming, progress: Rc<BodyProgress>, max: Option<u64>) -> Self {
        TrackedBody {
            inner,
            progress,
            allowed: max.unwrap_or(u64::MAX),
        }
    }
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                if len > self.allowed {
                    self.progress.too_large.set(true);
                    self.progress.end();
                    return std::task::Poll::Ready(Some(Err(BodyTooLarge.into())));
                }
                self.allowed -= len;
                self.progress.last.set(Instant::now());
                if self.inner.is_end_stream() {
                    self.progress.end();
                }
            }
            std::task::Poll::Ready(_) => self.progress.end(),
            std::task::Poll::Pending => {}
        }
        polled.map(|frame| frame.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
