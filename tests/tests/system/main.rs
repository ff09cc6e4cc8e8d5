//! baton's whole-system tests, one binary: real `baton-proxy` processes, real clients and real
//! upstream servers, all on loopback. See `tests/src` for the harness.

/// The admin listener.
mod admin;
/// What `baton check` and `baton reload` say of common mistakes: misspelt fields, URLs as
/// endpoints.
mod check;
/// The cluster manager: balancers, health checks, outlier detection, circuit breakers,
/// retries, rate limits, route matching, weighted clusters, mirroring, snapshots under load.
mod clusters;
/// Bad configurations and start-up errors: each with its message.
mod config;
/// The control socket and the `baton` commands: who may use it, finding it from a broken config.
mod control;
/// The Grafana dashboard in `contrib/` queries only metrics baton exposes.
mod dashboard;
/// SIGTERM drain, SIGINT.
mod drain;
/// The example configs: each passes `baton check`, and those that need nothing else serve;
/// the README's contents and the guides' links lead to headings that are there.
mod examples;
/// gRPC and HTTP/1.1 clients through `protocol = "http2"` clusters: streams, statuses, trailers.
mod grpc;
/// The guard dog: stalled workers counted, wedged generations replaced.
mod guard_dog;
/// Histogram buckets: defaults, a configured set, bad sets, reloads, older regions.
mod histograms;
/// Routing, proxying, bodies, keep-alive, pipelining, proxy headers, upstream failures, access log.
mod http1;
/// HTTP/2 cleartext (prior knowledge) and TLS with ALPN and SNI.
mod http2_tls;
/// Weighted least request with real origins: shares by weight, a loaded endpoint gets fewer.
mod least_request;
/// Limits: slow request headers (408), large headers (431), large bodies (413), connections.
mod limits;
/// Generations as an unprivileged user, on ports the supervisor binds.
mod privileges;
/// What the README promises of a supervised baton, each checked end to end: histograms never
/// go back, reopen-logs reaches every generation, a stop cuts nothing, a proxy speaking another
/// protocol changes nothing, the supervisor holds no more descriptors after many reloads.
mod promises;
/// Never without a proxy: crashes around reloads, the last good config, hurried drains, what a
/// reload checks.
mod recovery;
/// The supervisor: hot restart under load, failed reloads, crashes, binary upgrades.
mod reload;
/// Requests as attackers send them: paths normalised before routing, one valid authority,
/// malformed request bodies answered 400 as the client's fault.
mod requests;
/// The shared-memory stats region, read by `baton-stats` and the admin endpoints.
mod stats;
/// Life under systemd: sd_notify, the watchdog, the supervisor upgrading itself.
mod systemd;
/// The L4 (TCP) proxy.
mod tcp;
/// HTTP/1.1 as upstreams send it, byte for byte: framings, interim answers, closes, bad answers.
mod upstream_http1;
/// `--version` of each binary: its build, as the running service reports it.
mod version;
/// HTTP/1.1 upgrades: WebSocket through baton (cleartext and TLS), refusals, `h2c`, idle
/// tunnels, reloads.
mod websocket;

use std::net::SocketAddr;
use std::time::Duration;

/// Upper bound for anything a test waits on; generous for a loaded 2-core machine.
pub const WAIT: Duration = Duration::from_secs(20);

/// An HTTP listener on `listen` that sends everything to `origin`, with admin on `admin`.
pub fn http_config(listen: SocketAddr, admin: SocketAddr, origin: SocketAddr) -> String {
    format!(
        r#"
instance = "test"
concurrency = 2
drain_timeout = "10s"
drain_idle_grace = "500ms"

[admin]
address = "{admin}"

[[listener]]
name = "public"
address = "{listen}"
protocol = "http"
access_log = "access.log"

[[listener.route]]
hosts = ["direct.test"]
direct_response = {{ status = 201, body = "direct\n", headers = {{ "x-direct" = "yes" }} }}

[[listener.route]]
path_prefix = "/"
cluster = "origin"

[[cluster]]
name = "origin"
endpoints = ["{origin}"]
request_timeout = "1s"
"#
    )
}

/// Reads a `name: value` line of the admin's `/stats`.
pub async fn stat(admin: SocketAddr, name: &str) -> i64 {
    let stats = baton_tests::client::get(admin, "/stats").await.text();
    stats
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(": ")?.parse().ok())
        .unwrap_or_else(|| panic!("no stat {name} in:\n{stats}"))
}
