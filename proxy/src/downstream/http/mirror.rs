//! Mirroring: a copy of a request sent to the route's mirror cluster, its answer dropped.

use std::rc::Rc;

use crate::cluster::{ClusterRequest, HostRequest, Outcome};
use crate::config::{ClusterId, UpstreamProtocol};
use crate::runtime::context::WorkerContext;
use crate::upstream::send::{SendError, send};
use crate::upstream::state::Upstreams;

use super::headers;
use super::retry::{Template, is_idempotent};

/// Sends a copy of a request to the mirror cluster and drops the answer; the client never waits
/// for it. The host gets `-shadow` appended, as Envoy does, so that the shadow service can tell.
pub async fn shadow(
    worker: Rc<WorkerContext>,
    upstreams: Rc<Upstreams>,
    cluster_id: ClusterId,
    template: Template,
) {
    let cluster = worker.config.cluster(cluster_id);
    let wc = &upstreams.clusters[cluster_id.0];
    let stats = &worker.stats;
    let cluster_stats = &stats.ids.clusters[cluster_id.0];
    let Some(in_flight) = ClusterRequest::take(&wc.handle, cluster.breakers.max_requests) else {
        stats.shard.inc(cluster_stats.upstream_rq_overflow);
        return;
    };
    let Some(pick) = wc.handle.pick(cluster.lb_policy, &wc.lb, None, &[]) else {
        stats.shard.inc(cluster_stats.upstream_cx_none_healthy);
        return;
    };
    stats.shard.inc(cluster_stats.upstream_rq_total);
    stats.shard.inc(cluster_stats.upstream_rq_mirror);
    let mut request = template.request();
    headers::for_mirror(
        &mut request,
        cluster.protocol == UpstreamProtocol::Http2,
        &cluster.name,
    );
    let host = HostRequest::new(pick.host);
    let addr = host.host().address;
    // Everything, the answer's body included, within the cluster's request timeout: a shadow
    // that stalls must not hold the mirror cluster's counts.
    let deadline = tokio::time::Instant::now() + cluster.request_timeout;
    // A copy that a closed pooled connection did not carry is sent again only if it is safe to.
    let replayable = is_idempotent(request.method());
    let sent = tokio::time::timeout_at(
        deadline,
        send(&worker, &upstreams, cluster_id, addr, request, replayable),
    )
    .await;
    match sent {
        Ok(Ok((response, upstream))) => {
            wc.handle.report(
                host.host(),
                Outcome::Status(response.status().as_u16()),
                cluster.outlier.as_ref(),
            );
            // Read the answer to its end so that the connection can be used again.
            let (_, mut body) = response.into_parts();
            let drained = tokio::time::timeout_at(deadline, async {
                use http_body_util::BodyExt;
                while let Some(frame) = body.frame().await {
                    if frame.is_err() {
                        return false;
                    }
                }
                true
            })
            .await;
            if matches!(drained, Ok(true)) {
                upstream.release(&mut body);
            }
        }
        Ok(Err(SendError::Overflow(_))) => {}
        Ok(Err(_)) | Err(_) => {
            wc.handle
                .report(host.host(), Outcome::LocalFailure, cluster.outlier.as_ref());
        }
    }
    drop(host);
    drop(in_flight);
}
