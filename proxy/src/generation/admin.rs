//! The admin HTTP listener, served on the main thread: readiness, server info, stats, and the
//! health-check switch. It keeps answering while the generation drains, so that a load balancer
//! sees `/ready` turn to 503.

use std::cell::Cell;
use std::convert::Infallible;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::debug;

use shm_stats::format;

use super::running::{Info, State};
use crate::config::Config;

/// The version of this binary.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Tells one build of this binary from another (see `build.rs`).
pub const BUILD_ID: &str = env!("BATON_BUILD_ID");

pub struct Admin {
    pub config: Arc<Config>,
    pub info: Arc<Info>,
    pub region: Arc<shm_stats::Region>,
    pub clusters: Rc<crate::cluster::manager::Manager>,
    /// Tells the main loop to ask the supervisor for a drain (`/drain_listeners`); `None` when
    /// no supervisor can take it (run alone, or a supervisor too old for the request).
    pub drain: Option<Rc<tokio::sync::Notify>>,
    /// Debug builds: wedge a worker (`POST /debug/wedge?worker=N&ms=M`), to test the guard dog.
    #[cfg(debug_assertions)]
    pub wedgers: Vec<tokio::sync::mpsc::UnboundedSender<crate::worker::Command>>,
}

/// Admin connections open at once; one past it is closed as soon as it is accepted. Operators,
/// scrapers and health checkers need a handful; the cap keeps a flood of connections to the
/// admin address from taking the descriptors the listeners need.
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's head (slow clients hold a connection).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest an admin connection lives, kept alive or not: every answer is small and made at
/// once, so only an idle or stalled client reaches it.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves admin requests until the task is dropped.
pub async fn serve(admin: Rc<Admin>, listener: TcpListener) {
    let open = Rc::new(Cell::new(0usize));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!("admin accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if open.get() >= MAX_CONNECTIONS {
            debug!(%peer, "admin connection refused: {MAX_CONNECTIONS} are open");
            drop(stream);
            continue;
        }
        open.set(open.get() + 1);
        let open = open.clone();
        let admin = admin.clone();
        tokio::task::spawn_local(async move {
            let service = service_fn(move |request| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, &request)) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                Ok(Err(e)) => debug!(%peer, "admin connection ended: {e}"),
                Ok(Ok(())) => {}
                Err(_) => debug!(%peer, "admin connection closed after {CONNECTION_LIFETIME:?}"),
            }
            open.set(open.get() - 1);
        });
    }
}

fn route(admin: &Admin, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method();
    match request.uri().path() {
        "/" => text(StatusCode::OK, INDEX.to_owned()),
        "/ready" => only_get(method).unwrap_or_else(|| ready(admin)),
        "/server_info" => only_get(method).unwrap_or_else(|| server_info(admin)),
        "/stats" => only_get(method).unwrap_or_else(|| stats(admin, request.uri().query(), None)),
        // `/metrics` is where Prometheus looks unless told otherwise; `/stats/prometheus` is
        // where Envoy users look.
        "/metrics" | "/stats/prometheus" => only_get(method)
            .unwrap_or_else(|| stats(admin, request.uri().query(), Some(StatsFormat::Prometheus))),
        "/healthcheck/fail" => only_post(method).unwrap_or_else(|| {
            admin.info.set_healthcheck_failed(true);
            text(StatusCode::OK, "OK\n".to_owned())
        }),
        "/clusters" => only_get(method).unwrap_or_else(|| clusters(admin, request.uri().query())),
        "/drain_listeners" => only_post(method).unwrap_or_else(|| drain_listeners(admin)),
        #[cfg(debug_assertions)]
        "/debug/wedge" => only_post(method).unwrap_or_else(|| wedge(admin, request.uri().query())),
        "/healthcheck/ok" => only_post(method).unwrap_or_else(|| {
            admin.info.set_healthcheck_failed(false);
            text(StatusCode::OK, "OK\n".to_owned())
        }),
        other => text(
            StatusCode::NOT_FOUND,
            format!("no admin endpoint at {other}; GET / lists them\n"),
        ),
    }
}

const INDEX: &str = "\
baton-proxy admin
  GET  /ready             200 LIVE when serving; 503 when draining or failed by /healthcheck/fail
  GET  /server_info       version, build id, epoch, pid, state, uptime (JSON)
  GET  /stats             every stat, one `name{tags}: value` per line;
                          ?format=json for JSON, ?filter=REGEX to select by `name{tags}`
  GET  /metrics           every stat in the Prometheus text format (also at /stats/prometheus)
  GET  /clusters          every cluster's endpoints: health, weight, requests, ejection;
                          ?format=json for JSON
  POST /healthcheck/fail  make /ready answer 503 (take this proxy out of rotation)
  POST /healthcheck/ok    undo /healthcheck/fail
  POST /drain_listeners   stop accepting and drain this generation; none replaces it until
                          `baton reload` (as `baton drain`); clients wait in the accept queue
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatsFormat {
    Plain,
    Json,
    Prometheus,
}

/// `/stats` and `/stats/prometheus`: the shared region, as `baton-stats` would print it.
fn stats(admin: &Admin, query: Option<&str>, format: Option<StatsFormat>) -> Response<Full<Bytes>> {
    let mut filter = None;
    let mut format = format.unwrap_or(StatsFormat::Plain);
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match (&*key, &*value) {
            ("format", "json") => format = StatsFormat::Json,
            ("format", "prometheus") => format = StatsFormat::Prometheus,
            ("format", "text") => format = StatsFormat::Plain,
            ("format", other) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("unknown format `{other}`; use text, json or prometheus\n"),
                );
            }
            ("filter", pattern) => match regex::Regex::new(pattern) {
                Ok(re) => filter = Some(re),
                Err(e) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("filter is not a valid regular expression: {e}\n"),
                    );
                }
            },
            _ => {}
        }
    }
    let snapshot = match admin.region.snapshot() {
        Ok(s) => s,
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    };
    let selected: Vec<_> = snapshot
        .stats
        .iter()
        .filter(|s| {
            filter
                .as_ref()
                .is_none_or(|f| f.is_match(&format::display_name(s)))
        })
        .collect();
    let (body, content_type) = match format {
        StatsFormat::Plain => (format::plain(&selected), "text/plain; charset=utf-8"),
        StatsFormat::Json => (
            format::json(
                &snapshot,
                &admin.region.path().display().to_string(),
                &selected,
            ),
            "application/json",
        ),
        StatsFormat::Prometheus => (
            format::prometheus(&selected),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn ready(admin: &Admin) -> Response<Full<Bytes>> {
    match (admin.info.state(), admin.info.healthcheck_failed()) {
        (State::Live, false) => text(StatusCode::OK, "LIVE\n".to_owned()),
        (State::Live, true) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "FAILED_HEALTHCHECK\n".to_owned(),
        ),
        (State::Draining, _) => text(StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n".to_owned()),
    }
}

/// Debug builds only: blocks a worker's thread, as a bug would.
#[cfg(debug_assertions)]
fn wedge(admin: &Admin, query: Option<&str>) -> Response<Full<Bytes>> {
    let (mut worker, mut ms) = (0usize, 0u64);
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*key {
            "worker" => worker = value.parse().unwrap_or(usize::MAX),
            "ms" => ms = value.parse().unwrap_or(0),
            _ => {}
        }
    }
    let sent = admin.wedgers.get(worker).is_some_and(|w| {
        w.send(crate::worker::Command::Wedge(
            std::time::Duration::from_millis(ms),
        ))
        .is_ok()
    });
    if sent {
        text(
            StatusCode::OK,
            format!("wedging worker {worker} for {ms} ms\n"),
        )
    } else {
        text(StatusCode::NOT_FOUND, format!("no worker {worker}\n"))
    }
}

fn drain_listeners(admin: &Admin) -> Response<Full<Bytes>> {
    if admin.info.state() == State::Draining {
        return text(StatusCode::OK, "already draining\n".to_owned());
    }
    match &admin.drain {
        Some(request) => {
            request.notify_one();
            text(
                StatusCode::ACCEPTED,
                "drain asked of the supervisor: this generation stops accepting and finishes its connections, unless a generation is starting (see `baton status`); `baton reload` starts a new one\n"
                    .to_owned(),
            )
        }
        None => text(
            StatusCode::CONFLICT,
            "not drained: no supervisor that can hold this generation's listen sockets while it is drained (it runs alone, or under a supervisor too old for this request); run it under `baton run`, use `baton drain`, or send it SIGTERM to drain and exit\n"
                .to_owned(),
        ),
    }
}

fn server_info(admin: &Admin) -> Response<Full<Bytes>> {
    let info = &admin.info;
    let body = serde_json::json!({
        "version": VERSION,
        "build_id": BUILD_ID,
        "instance": admin.config.instance,
        "epoch": info.epoch,
        "pid": std::process::id(),
        "state": info.state().name(),
        "healthcheck_failed": info.healthcheck_failed(),
        "uptime_seconds": info.started.elapsed().as_secs(),
        "concurrency": info.concurrency,
        // As `baton status` shows it: absolute, whatever the command line said.
        "config": std::path::absolute(&admin.config.path)
            .unwrap_or_else(|_| admin.config.path.clone())
            .display()
            .to_string(),
    });
    let mut response = Response::new(Full::new(Bytes::from(format!("{body:#}\n"))));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn only_get(method: &Method) -> Option<Response<Full<Bytes>>> {
    (method != Method::GET && method != Method::HEAD).then(|| not_allowed("GET"))
}

fn only_post(method: &Method) -> Option<Response<Full<Bytes>>> {
    (method != Method::POST).then(|| not_allowed("POST"))
}

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("this endpoint takes {allow}\n"),
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

/// `/clusters`: each cluster's current snapshot, as the workers see it; Envoy's
/// `cluster::host::field::value` lines, or JSON.
fn clusters(admin: &Admin, query: Option<&str>) -> Response<Full<Bytes>> {
    let json = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .any(|(k, v)| k == "format" && v == "json");
    let handles = admin.clusters.handles();
    let mut lines = String::new();
    let mut list = Vec::new();
    for (index, (cluster, handle)) in admin.config.clusters.iter().zip(&handles).enumerate() {
        let snapshot = handle.snapshot.load();
        let failures = admin.clusters.last_failures(index);
        let name = &cluster.name;
        let b = cluster.breakers;
        let breakers = [
            ("max_connections", b.max_connections),
            ("max_pending_requests", b.max_pending_requests),
            ("max_requests", b.max_requests),
            ("max_retries", b.max_retries),
        ];
        for (field, value) in breakers {
            lines.push_str(&format!("{name}::default_priority::{field}::{value}\n"));
        }
        let counts = [
            ("cx_active", handle.cx_active.load(Ordering::Relaxed)),
            ("rq_pending", handle.rq_pending.load(Ordering::Relaxed)),
            ("rq_active", handle.rq_active.load(Ordering::Relaxed)),
            (
                "rq_retries_active",
                handle.retries_active.load(Ordering::Relaxed),
            ),
        ];
        for (field, value) in counts {
            lines.push_str(&format!("{name}::{field}::{value}\n"));
        }
        lines.push_str(&format!(
            "{name}::lb_policy::{}\n{name}::panic::{}\n",
            cluster.lb_policy.name(),
            snapshot.panic
        ));
        let mut hosts = Vec::new();
        for (host, flags) in &snapshot.hosts {
            let a = host.address;
            let rq_active = host.rq_active.load(Ordering::Relaxed);
            let rq_total = host.rq_total.load(Ordering::Relaxed);
            let rq_error = host.rq_error.load(Ordering::Relaxed);
            lines.push_str(&format!(
                "{name}::{a}::health_flags::{}\n{name}::{a}::weight::{}\n{name}::{a}::rq_active::{rq_active}\n{name}::{a}::rq_total::{rq_total}\n{name}::{a}::rq_error::{rq_error}\n",
                flags.describe(),
                host.weight
            ));
            let last_failure = failures
                .iter()
                .find(|(addr, _)| *addr == a)
                .map(|(_, why)| why.clone());
            if let Some(why) = &last_failure {
                lines.push_str(&format!("{name}::{a}::last_health_check_failure::{why}\n"));
            }
            hosts.push(serde_json::json!({
                "address": a.to_string(),
                "weight": host.weight,
                "health_flags": flags.describe(),
                "healthy": flags.healthy(),
                "failed_active_health_check": flags.failed_active_hc,
                "pending_active_health_check": flags.pending_active_hc,
                "ejected": flags.ejected,
                "pending_removal": flags.pending_removal,
                "rq_active": rq_active,
                "rq_total": rq_total,
                "rq_error": rq_error,
                "last_health_check_failure": last_failure,
            }));
        }
        list.push(serde_json::json!({
            "name": name,
            "lb_policy": cluster.lb_policy.name(),
            "version": snapshot.version,
            "panic": snapshot.panic,
            "circuit_breakers": {
                "max_connections": b.max_connections,
                "max_pending_requests": b.max_pending_requests,
                "max_requests": b.max_requests,
                "max_retries": b.max_retries,
                "connections": handle.cx_active.load(Ordering::Relaxed),
                "pending_requests": handle.rq_pending.load(Ordering::Relaxed),
                "requests": handle.rq_active.load(Ordering::Relaxed),
                "retries": handle.retries_active.load(Ordering::Relaxed),
            },
            "hosts": hosts,
        }));
    }
    if !json {
        return text(StatusCode::OK, lines);
    }
    let body =
        serde_json::to_string_pretty(&serde_json::json!({ "clusters": list })).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body + "\n")));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
