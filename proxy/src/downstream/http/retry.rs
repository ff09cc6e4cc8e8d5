//! The tries of one request: a host from the balancer, a send, and, under the route's retry
//! policy, more tries on other hosts, with backoff and the cluster's retry budget.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri};
use http_body_util::{Either, Full};
use tracing::debug;

use crate::cluster::{ActiveRetry, HostRequest, Outcome};
use crate::config::{ClusterId, ClusterRoute, RetryPolicy};
use crate::stats;
use crate::upstream::h1;
use crate::upstream::request::{BodyProgress, RequestBody};
use crate::upstream::response::{Upstream, UpstreamBody};
use crate::upstream::send::{SendError, send};

use super::ctx::ConnCtx;

/// A try that got an answer.
pub struct Sent {
    pub response: Response<UpstreamBody>,
    pub upstream: Upstream,
    pub host: HostRequest,
}

/// How the tries of one request ended, and the last endpoint tried.
pub type Tried = (Result<Sent, TryError>, Option<SocketAddr>);

/// Why a try got no answer: the send failed, or the tries gave up on it.
pub enum TryError {
    Send(SendError),
    /// The route's `per_try_timeout` passed.
    PerTryTimeout,
    /// The cluster has no endpoint to send to.
    NoHost,
}

/// Bodies of requests that may be retried or mirrored are kept up to this size (a declared one).
pub const RETRY_BUFFER_LIMIT: u64 = 64 * 1024;

/// What a request needs to be sent again: its head, and its body when it was kept.
#[derive(Clone)]
pub struct Template {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Template {
    pub fn request(&self) -> Request<RequestBody> {
        let mut request = Request::new(Either::Right(Full::new(self.body.clone())));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// The tries of one request: a host from the balancer, a send, and, under the route's retry
/// policy, more tries on other hosts.
pub struct Tries<'a> {
    pub(super) ctx: &'a ConnCtx,
    pub(super) route: &'a ClusterRoute,
    pub(super) cluster_id: ClusterId,
    pub(super) hash: Option<u64>,
    pub(super) retry: Option<RetryPolicy>,
    pub(super) template: Option<&'a Template>,
    pub(super) replayable: bool,
    pub(super) progress: &'a BodyProgress,
    /// The host of the try in flight, for outlier detection when the request times out.
    pub(super) current: std::cell::RefCell<Option<HostRequest>>,
}

impl Tries<'_> {
    pub async fn run(&self, first: Request<RequestBody>) -> Tried {
        let worker = &self.ctx.worker;
        let cluster = worker.config.cluster(self.cluster_id);
        let wc = &self.ctx.upstreams.clusters[self.cluster_id.0];
        let stats = &worker.stats;
        let cluster_stats = &stats.ids.clusters[self.cluster_id.0];
        let mut request = Some(first);
        // Endpoints tried before, for a retry to go elsewhere (allocated only for a retry).
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last = None;
        let mut retries = 0;
        let mut _retrying: Option<ActiveRetry> = None;
        loop {
            let Some(pick) = wc.handle.pick(cluster.lb_policy, &wc.lb, self.hash, &tried) else {
                return (Err(TryError::NoHost), last);
            };
            if pick.panic {
                stats.shard.inc(cluster_stats.lb_healthy_panic);
            }
            let addr = pick.host.address;
            last = Some(addr);
            // Held here while the try runs, so that a request timeout can still name its host.
            *self.current.borrow_mut() = Some(HostRequest::new(pick.host));
            stats.shard.inc(cluster_stats.upstream_rq_total);
            let Some(this) = request
                .take()
                .or_else(|| self.template.map(Template::request))
            else {
                unreachable!("a retried request has a template");
            };
            let attempt = send(
                worker,
                &self.ctx.upstreams,
                self.cluster_id,
                addr,
                this,
                self.replayable,
            );
            let started = std::time::Instant::now();
            let result = match self.route.per_try_timeout {
                // Each try's time starts when the client's body is all sent (a slow upload is
                // not a slow upstream), as the request's own timeout does.
                Some(limit) => tokio::select! {
                    result = attempt => result.map_err(TryError::Send),
                    _ = async {
                        let ended = self.progress.ended().await;
                        tokio::time::sleep_until((ended.max(started) + limit).into()).await;
                    } => {
                        stats.shard.inc(cluster_stats.upstream_rq_per_try_timeout);
                        Err(TryError::PerTryTimeout)
                    }
                },
                None => attempt.await.map_err(TryError::Send),
            };
            let Some(host) = self.current.borrow_mut().take() else {
                unreachable!("the try's host is set before it runs");
            };
            // The client's own failures (its body broke off, or went past max_request_body)
            // say nothing of the upstream, and are not tried again.
            let clients_fault = self.progress.too_large()
                || matches!(&result, Err(TryError::Send(SendError::Reset(e))) if e.is_user())
                || matches!(
                    &result,
                    Err(TryError::Send(SendError::Http1(h1::Error::RequestBody(_))))
                );
            if let Ok((response, _)) = &result
                && let Some(class) = stats::class_index(response.status().as_u16())
            {
                stats.shard.inc(cluster_stats.upstream_rq_class[class]);
            }
            let outcome = match &result {
                _ if clients_fault => None,
                Ok((response, _)) => Some(Outcome::Status(response.status().as_u16())),
                Err(TryError::Send(SendError::Overflow(_)) | TryError::NoHost) => None,
                Err(_) => Some(Outcome::LocalFailure),
            };
            if let Some(outcome) = outcome {
                wc.handle
                    .report(host.host(), outcome, cluster.outlier.as_ref());
            }
            if let Some(policy) = self.retry
                && retries < policy.num_retries
                && !clients_fault
                && should_retry(&policy, &result)
            {
                match ActiveRetry::take(
                    &wc.handle,
                    cluster.breakers.max_retries,
                    policy.budget_percent,
                    policy.min_retry_concurrency,
                ) {
                    Some(active) => {
                        retries += 1;
                        _retrying = Some(active);
                        tried.push(addr);
                        stats.shard.inc(cluster_stats.upstream_rq_retry);
                        debug!(worker = worker.id, upstream = %addr, retry = retries, "retrying");
                        drop(result);
                        drop(host);
                        tokio::time::sleep(backoff(&policy, retries)).await;
                        continue;
                    }
                    None => stats.shard.inc(cluster_stats.upstream_rq_retry_overflow),
                }
            }
            if retries > 0 && matches!(&result, Ok((r, _)) if r.status().as_u16() < 500) {
                stats.shard.inc(cluster_stats.upstream_rq_retry_success);
            }
            return (
                result.map(|(response, upstream)| Sent {
                    response,
                    upstream,
                    host,
                }),
                Some(addr),
            );
        }
    }
}

/// Whether a try's end is one the policy retries.
fn should_retry(
    policy: &RetryPolicy,
    result: &Result<(Response<UpstreamBody>, Upstream), TryError>,
) -> bool {
    let on = &policy.on;
    match result {
        Ok((response, _)) => {
            let s = response.status().as_u16();
            (on.server_error && s >= 500)
                || (on.gateway_error && matches!(s, 502..=504))
                || on.statuses.contains(&s)
        }
        Err(TryError::Send(SendError::Connect(_))) => {
            on.connect_failure || on.server_error || on.gateway_error
        }
        Err(
            TryError::Send(SendError::Reset(_) | SendError::Http1(_)) | TryError::PerTryTimeout,
        ) => on.reset || on.server_error || on.gateway_error,
        Err(TryError::Send(SendError::Overflow(_)) | TryError::NoHost) => false,
    }
}

/// Exponential backoff with full jitter (as Envoy's): a random time up to
/// `base * 2^(n-1)`, capped at `max_interval`.
fn backoff(policy: &RetryPolicy, retry: u32) -> Duration {
    let ceiling = policy
        .base_interval
        .saturating_mul(1 << (retry - 1).min(16))
        .min(policy.max_interval);
    let ms = u64::try_from(ceiling.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    Duration::from_millis(fastrand::u64(0..=ms))
}

pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}
