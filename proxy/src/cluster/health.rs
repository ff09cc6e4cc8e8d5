//! Active health checks: one task per endpoint on the main thread, probing at the cluster's
//! interval and telling the manager each result. The manager applies the thresholds.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, HOST, USER_AGENT};
use http::{HeaderValue, Request};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::debug;

use super::Event;
use crate::config::{HealthCheck, HealthCheckKind};
use crate::runtime::LocalExec;

/// Probes `address` now and then every `interval` (with a little jitter, so that the checks of
/// many endpoints do not go out together), until the task is aborted.
pub async fn run(
    cluster: usize,
    address: SocketAddr,
    check: HealthCheck,
    http2: bool,
    events: mpsc::UnboundedSender<Event>,
) {
    loop {
        let (failure, timed_out) =
            match tokio::time::timeout(check.timeout, probe(address, &check.kind, http2)).await {
                Ok(result) => (result.err(), false),
                Err(_) => (
                    Some(format!(
                        "no answer within the timeout ({:?})",
                        check.timeout
                    )),
                    true,
                ),
            };
        if let Some(why) = &failure {
            debug!(upstream = %address, "health check failed: {why}");
        }
        if events
            .send(Event::Checked {
                cluster,
                address,
                failure,
                timed_out,
            })
            .is_err()
        {
            return;
        }
        let jitter = check.interval.as_millis() as u64 / 10;
        let jitter = Duration::from_millis(fastrand::u64(0..=jitter));
        tokio::time::sleep(check.interval + jitter).await;
    }
}

/// One check: a TCP connection opens, or `GET path` answers an expected status (in HTTP/2 with
/// prior knowledge for `protocol = "http2"` clusters, HTTP/1.1 otherwise).
async fn probe(address: SocketAddr, kind: &HealthCheckKind, http2: bool) -> Result<(), String> {
    let stream = TcpStream::connect(address)
        .await
        .map_err(|e| format!("connect failed: {e}"))?;
    let HealthCheckKind::Http {
        path,
        host,
        expected,
    } = kind
    else {
        return Ok(());
    };
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    let request = Request::get(path.as_str()).header(USER_AGENT, "baton-health-check");
    let answer = if http2 {
        // An HTTP/2 cluster's endpoints may speak nothing else (a gRPC server): ask in HTTP/2,
        // with the host as `:authority`.
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(LocalExec, io)
                .await
                .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
        tokio::task::spawn_local(async move {
            let _ = connection.await;
        });
        let request = request
            .uri(format!("http://{host}{path}"))
            .version(http::Version::HTTP_2)
            .body(Empty::new())
            .map_err(|e| format!("cannot make the request: {e}"))?;
        sender.send_request(request).await
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
            .await
            .map_err(|e| format!("HTTP handshake failed: {e}"))?;
        tokio::task::spawn_local(async move {
            let _ = connection.await;
        });
        let host = HeaderValue::from_str(host).map_err(|e| format!("bad host: {e}"))?;
        let request = request
            .header(HOST, host)
            .header(CONNECTION, "close")
            .body(Empty::new())
            .map_err(|e| format!("cannot make the request: {e}"))?;
        sender.send_request(request).await
    };
    let status = answer
        .map_err(|e| format!("request failed: {e}"))?
        .status()
        .as_u16();
    if expected.iter().any(|r| r.contains(&status)) {
        Ok(())
    } else {
        Err(format!("status {status}, not one of expected_statuses"))
    }
}
