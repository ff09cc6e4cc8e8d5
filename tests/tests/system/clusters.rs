use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use baton_tests::client::{self, H1, request};
use baton_tests::load::{Load, Mode};
use baton_tests::proxy::Proxy;
use baton_tests::upstream::Origin;
use baton_tests::{free_addr, wait_until_async};

use crate::{WAIT, stat};

/// The start of a config: a concurrency (0: the default), the admin listener, and an HTTP
/// listener `public` whose one route goes to `cluster`.
fn front(listen: SocketAddr, admin: SocketAddr, concurrency: usize, cluster: &str) -> String {
    let concurrency = if concurrency == 0 {
        String::new()
    } else {
        format!("concurrency = {concurrency}\n")
    };
    format!(
        "{concurrency}[admin]\naddress = \"{admin}\"\n\n[[listener]]\nname = \"public\"\naddress = \"{listen}\"\nprotocol = \"http\"\nroute = [{{ cluster = \"{cluster}\" }}]\n"
    )
}

/// `/clusters?format=json` of the admin.
async fn clusters(admin: SocketAddr) -> serde_json::Value {
    client::get(admin, "/clusters?format=json").await.json()
}

/// The `/clusters` entry of one host.
async fn host(admin: SocketAddr, cluster: &str, addr: SocketAddr) -> serde_json::Value {
    let all = clusters(admin).await;
    all["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == cluster)
        .unwrap_or_else(|| panic!("no cluster {cluster} in {all}"))["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["address"] == addr.to_string())
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// Waits until `addr` in `cluster` is (or is not) healthy in `/clusters`.
async fn wait_health(admin: SocketAddr, cluster: &str, addr: SocketAddr, healthy: bool) -> bool {
    wait_until_async(WAIT, || async {
        host(admin, cluster, addr).await["healthy"] == healthy
    })
    .await
}

/// Sends `GET path` with `headers` and returns the name of the origin that answered.
async fn who(c: &mut H1, path: &str, headers: &[(&str, &str)]) -> String {
    let mut req = request("GET", "app.test", path, "");
    for (name, value) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            http::HeaderValue::from_str(value).unwrap(),
        );
    }
    let r = c.send(req).await.expect("an answer");
    assert_eq!(r.status, 200, "{}", r.text());
    r.header("x-upstream-name")
        .unwrap_or_else(|| panic!("no x-upstream-name: {}", r.text()))
        .to_owned()
}

fn shares(counts: &HashMap<String, usize>, name: &str) -> f64 {
    let total: usize = counts.values().sum();
    *counts.get(name).unwrap_or(&0) as f64 / total as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_balancer_spreads_requests_as_configured() {
    let (a, b, c) = (
        Origin::start("a").await,
        Origin::start("b").await,
        Origin::start("c").await,
    );
    let (listen, admin) = (free_addr(), free_addr());
    let (a_, b_, c_) = (a.addr, b.addr, c.addr);
    let hc = r#"health_check = { type = "tcp", interval = "100ms", timeout = "1s", unhealthy_threshold = 1, healthy_threshold = 1 }"#;
    let _proxy = Proxy::start(&format!(
        r#"
concurrency = 1
[admin]
address = "{admin}"

[[listener]]
name = "public"
address = "{listen}"
protocol = "http"
route = [
  {{ path_prefix = "/rr", cluster = "rr" }},
  {{ path_prefix = "/random", cluster = "random" }},
  {{ path_prefix = "/least", cluster = "least" }},
  {{ path_prefix = "/ring", cluster = "ring" }},
  {{ path_prefix = "/maglev", cluster = "maglev" }},
]

[[cluster]]
name = "rr"
endpoints = ["{a_} weight=1", "{b_} weight=2", "{c_} weight=3"]

[[cluster]]
name = "random"
lb_policy = "random"
endpoints = ["{a_}", "{b_}", "{c_} weight=2"]

[[cluster]]
name = "least"
lb_policy = "least_request"
endpoints = ["{a_}", "{b_}", "{c_}"]

[[cluster]]
name = "ring"
lb_policy = "ring_hash"
hash_key = {{ header = "x-user" }}
endpoints = ["{a_}", "{b_}", "{c_}"]
{hc}

[[cluster]]
name = "maglev"
lb_policy = "maglev"
hash_key = {{ header = "x-user" }}
endpoints = ["{a_}", "{b_}", "{c_}"]
{hc}
"#
    ));
    let mut conn = H1::connect(listen).await.unwrap();

    // Weighted round robin, one worker: exactly by weight, interleaved.
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut order = Vec::new();
    for _ in 0..600 {
        let name = who(&mut conn, "/rr", &[]).await;
        order.push(name.clone());
        *counts.entry(name).or_default() += 1;
    }
    assert_eq!(
        (counts["a"], counts["b"], counts["c"]),
        (100, 200, 300),
        "round robin by weight"
    );
    assert!(
        order.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2])),
        "weights are interleaved, not in runs: {:?}",
        &order[..12]
    );

    // Random, by weight: within a tolerance.
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..2000 {
        *counts
            .entry(who(&mut conn, "/random", &[]).await)
            .or_default() += 1;
    }
    for (name, want) in [("a", 0.25), ("b", 0.25), ("c", 0.5)] {
        let got = shares(&counts, name);
        assert!(
            (got - want).abs() < 0.05,
            "random: {name} got {got}, want {want}: {counts:?}"
        );
    }

    // Least request with no load: every endpoint gets its share.
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..1500 {
        *counts
            .entry(who(&mut conn, "/least", &[]).await)
            .or_default() += 1;
    }
    for name in ["a", "b", "c"] {
        let got = shares(&counts, name);
        assert!(
            (got - 1.0 / 3.0).abs() < 0.06,
            "least request: {name} got {got}: {counts:?}"
        );
    }

    // Ring hash and Maglev: a key stays on its endpoint, and keys spread.
    const KEYS: usize = 600;
    let mut placed: HashMap<(&str, usize), String> = HashMap::new();
    for policy in ["ring", "maglev"] {
        let path = format!("/{policy}");
        let mut counts: HashMap<String, usize> = HashMap::new();
        for key in 0..KEYS {
            let user = format!("user-{key}");
            let first = who(&mut conn, &path, &[("x-user", &user)]).await;
            let again = who(&mut conn, &path, &[("x-user", &user)]).await;
            assert_eq!(
                first, again,
                "{policy}: key {user} moved between two requests"
            );
            *counts.entry(first.clone()).or_default() += 1;
            placed.insert((policy, key), first);
        }
        for name in ["a", "b", "c"] {
            let got = shares(&counts, name);
            assert!(
                (got - 1.0 / 3.0).abs() < 0.1,
                "{policy}: {name} got {got}: {counts:?}"
            );
        }
    }

    // Endpoint c goes away: its keys move, the others' (nearly all) stay.
    drop(c);
    for cluster in ["ring", "maglev"] {
        assert!(
            wait_health(admin, cluster, c_, false).await,
            "c is seen down in {cluster}"
        );
    }
    for policy in ["ring", "maglev"] {
        let path = format!("/{policy}");
        let (mut stayed, mut moved) = (0, 0);
        for key in 0..KEYS {
            let user = format!("user-{key}");
            let now = who(&mut conn, &path, &[("x-user", &user)]).await;
            assert_ne!(
                now, "c",
                "{policy}: nothing goes to the endpoint that is down"
            );
            let before = &placed[&(policy, key)];
            if before != "c" {
                if *before == now {
                    stayed += 1;
                } else {
                    moved += 1;
                }
            }
        }
        let share = moved as f64 / (stayed + moved) as f64;
        // Ring hash moves none of them; Maglev a few (its table is rebuilt).
        let limit = if policy == "ring" { 0.0 } else { 0.1 };
        assert!(
            share <= limit,
            "{policy}: {moved} of {} keys of the endpoints that stayed moved",
            stayed + moved
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_killed_under_load_is_routed_around_and_comes_back() {
    let a = Origin::start("a").await;
    let mut b = Some(Origin::start("b").await);
    let c = Origin::start("c").await;
    let b_addr = b.as_ref().unwrap().addr;
    let (listen, admin) = (free_addr(), free_addr());
    let _proxy = Proxy::start(&format!(
        r#"
concurrency = 2
[admin]
address = "{admin}"

[[listener]]
name = "public"
address = "{listen}"
protocol = "http"

[[listener.route]]
cluster = "app"
per_try_timeout = "2s"
retry = {{ retry_on = ["connect-failure", "reset", "gateway-error"], num_retries = 2 }}

[[cluster]]
name = "app"
endpoints = ["{}", "{b_addr}", "{}"]
health_check = {{ type = "http", path = "/healthz", interval = "100ms", timeout = "500ms", unhealthy_threshold = 2, healthy_threshold = 2 }}
outlier_detection = {{ consecutive_gateway_failure = 2, base_ejection_time = "1s", max_ejection_percent = 50 }}
"#,
        a.addr, c.addr
    ));
    assert!(wait_health(admin, "app", b_addr, true).await);
    let load = Load::start(listen, "/", Mode::KeepAlive, 4, Duration::from_secs(60));
    let served_by_all = || async { a.requests() > 50 && c.requests() > 50 };
    assert!(wait_until_async(WAIT, served_by_all).await);
    let b_before = b.as_ref().unwrap().requests();
    assert!(b_before > 0, "b was serving before it died");

    // b dies: its listener and every connection close at once.
    drop(b.take());
    assert!(
        wait_until_async(WAIT, || async {
            host(admin, "app", b_addr).await["failed_active_health_check"] == true
        })
        .await,
        "health checks see b down"
    );
    let ok_before = load.snapshot().ok;
    assert!(
        wait_until_async(WAIT, || async { load.snapshot().ok > ok_before + 200 }).await,
        "the load goes on without b"
    );

    // b comes back on its address: health checks bring it back into rotation.
    let b = Origin::start_at("b", b_addr).await;
    assert!(
        wait_health(admin, "app", b_addr, true).await,
        "health checks see b again"
    );
    assert!(
        wait_until_async(WAIT, || async { b.requests() > 20 }).await,
        "b serves again"
    );
    let report = load.stop().await;
    assert_eq!(
        report.failures(),
        0,
        "no client saw the endpoint die: {report:?}"
    );
    assert!(report.ok > 500, "{report:?}");
    assert!(stat(admin, "health_check_failure{cluster=app}").await >= 2);
    assert_eq!(stat(admin, "membership_healthy{cluster=app}").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_an_endpoint_that_answers_5xx_and_lets_it_back() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let (listen, admin) = (free_addr(), free_addr());
    let front = front(listen, admin, 1, "app");
    let _proxy = Proxy::start(&format!(
        r#"
{front}

[[cluster]]
name = "app"
endpoints = ["{}", "{}"]
outlier_detection = {{ consecutive_5xx = 3, base_ejection_time = "3s", max_ejection_percent = 50 }}
"#,
        a.addr, b.addr
    ));
    b.fail_with(Some(500));
    let mut conn = H1::connect(listen).await.unwrap();
    let mut failures = 0;
    for _ in 0..6 {
        let r = conn.get("/").await.unwrap();
        if r.status == 500 {
            failures += 1;
        }
    }
    assert_eq!(failures, 3, "round robin sent every other request to b");
    assert!(
        wait_until_async(WAIT, || async {
            host(admin, "app", b.addr).await["ejected"] == true
        })
        .await,
        "b is ejected after 3 5xx in a row"
    );
    assert_eq!(
        host(admin, "app", b.addr).await["health_flags"],
        "/failed_outlier_check"
    );
    for _ in 0..20 {
        let r = conn.get("/").await.unwrap();
        assert_eq!(r.text(), "upstream a\n", "an ejected endpoint gets nothing");
    }
    assert_eq!(stat(admin, "outlier_ejections_total{cluster=app}").await, 1);
    assert_eq!(
        stat(admin, "outlier_ejections_active{cluster=app}").await,
        1
    );

    // The ejection ends after base_ejection_time; b answers well now.
    b.fail_with(None);
    assert!(
        wait_health(admin, "app", b.addr, true).await,
        "the ejection ends"
    );
    let mut from_b = 0;
    for _ in 0..10 {
        if conn.get("/").await.unwrap().text() == "upstream b\n" {
            from_b += 1;
        }
    }
    assert_eq!(from_b, 5, "b takes its share again");
}

/// `GET path` on a new connection, with the header that routes to the `narrow` cluster.
async fn narrow(listen: SocketAddr, path: &str) -> client::Reply {
    let mut c = H1::connect(listen).await.unwrap();
    let mut req = request("GET", "app.test", path, "");
    req.headers_mut()
        .insert("x-narrow", http::HeaderValue::from_static("1"));
    c.send(req).await.expect("an answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breakers_and_rate_limits_answer_exact_counts() {
    let origin = Origin::start("a").await;
    let (listen, admin) = (free_addr(), free_addr());
    let _proxy = Proxy::start(&format!(
        r#"
concurrency = 2
[admin]
address = "{admin}"

[[listener]]
name = "public"
address = "{listen}"
protocol = "http"
route = [
  {{ path_prefix = "/limited", direct_response = {{ status = 200, body = "ok\n" }}, rate_limit = {{ max_tokens = 5, fill_interval = "1h" }} }},
  {{ headers = [{{ name = "x-narrow", present = true }}], cluster = "narrow" }},
  {{ cluster = "app" }},
]

[[cluster]]
name = "app"
endpoints = ["{0}"]
request_timeout = "10s"
circuit_breakers = {{ max_requests = 2 }}

[[cluster]]
name = "narrow"
endpoints = ["{0}"]
request_timeout = "10s"
circuit_breakers = {{ max_connections = 1, max_pending_requests = 1 }}
"#,
        origin.addr
    ));

    // max_requests = 2: two slow requests in flight, then every other request is refused.
    let slow: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { client::get(listen, "/slow/3000").await }))
        .collect();
    assert!(wait_until_async(WAIT, || async { origin.requests() == 2 }).await);
    for _ in 0..5 {
        let r = client::get(listen, "/x").await;
        assert_eq!(r.status, 503);
        assert_eq!(r.header("x-baton-overloaded"), Some("max_requests"));
    }
    for s in slow {
        assert_eq!(s.await.unwrap().status, 200);
    }
    assert_eq!(stat(admin, "upstream_rq_overflow{cluster=app}").await, 5);
    assert_eq!(client::get(listen, "/x").await.status, 200, "room again");

    // max_connections = 1, max_pending_requests = 1: one request holds the connection, one
    // waits for it, the rest are refused.
    let before = origin.requests();
    let holding = tokio::spawn(async move { narrow(listen, "/slow/2000").await });
    assert!(wait_until_async(WAIT, || async { origin.requests() == before + 1 }).await);
    let waiting = tokio::spawn(async move { narrow(listen, "/after").await });
    assert!(
        wait_until_async(WAIT, || async {
            clusters(admin).await["clusters"][1]["circuit_breakers"]["pending_requests"] == 1
        })
        .await,
        "the second request waits for the connection"
    );
    for _ in 0..3 {
        let r = narrow(listen, "/x").await;
        assert_eq!(r.status, 503);
        assert_eq!(r.header("x-baton-overloaded"), Some("max_pending_requests"));
    }
    assert_eq!(holding.await.unwrap().status, 200);
    let waited = waiting.await.unwrap();
    assert_eq!(waited.status, 200, "the waiting request got the connection");
    assert_eq!(
        stat(admin, "upstream_rq_pending_overflow{cluster=narrow}").await,
        3
    );

    // A token bucket of 5 that does not refill within the test: 5 pass, 7 get 429.
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let r = client::get(listen, "/limited").await;
        if r.status == 429 {
            // The bucket fills hourly: the next token is most of an hour away.
            let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
            assert!((3000..=3600).contains(&after), "retry-after: {after}");
        }
        statuses.push(r.status.as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 429).count(),
        7,
        "{statuses:?}"
    );
    assert_eq!(
        stat(admin, "downstream_rq_rate_limited{listener=public}").await,
        7
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_headers_and_exact_paths_split_by_weight_and_mirror() {
    let (stable, canary, blue, green, shadow) = (
        Origin::start("stable").await,
        Origin::start("canary").await,
        Origin::start("blue").await,
        Origin::start("green").await,
        Origin::start("shadow").await,
    );
    let listen = free_addr();
    let _proxy = Proxy::start(&format!(
        r#"
[[listener]]
name = "public"
address = "{listen}"
protocol = "http"

[[listener.route]]
path_exact = "/exact"
direct_response = {{ status = 200, body = "exact\n" }}

[[listener.route]]
headers = [{{ name = "x-canary", exact = "1" }}]
cluster = "canary"

[[listener.route]]
headers = [{{ name = "x-beta", present = true }}, {{ name = "x-user", regex = "[a-m].*" }}]
cluster = "canary"

[[listener.route]]
path_prefix = "/split"
weighted_clusters = [{{ cluster = "blue", weight = 80 }}, {{ cluster = "green", weight = 20 }}]

[[listener.route]]
cluster = "stable"
mirror = {{ cluster = "shadow", percent = 100 }}

[[cluster]]
name = "stable"
endpoints = ["{}"]
[[cluster]]
name = "canary"
endpoints = ["{}"]
[[cluster]]
name = "blue"
endpoints = ["{}"]
[[cluster]]
name = "green"
endpoints = ["{}"]
[[cluster]]
name = "shadow"
endpoints = ["{}"]
"#,
        stable.addr, canary.addr, blue.addr, green.addr, shadow.addr
    ));
    let mut c = H1::connect(listen).await.unwrap();
    assert_eq!(c.get("/exact").await.unwrap().text(), "exact\n");
    assert_eq!(
        who(&mut c, "/exact/more", &[]).await,
        "stable",
        "exact is exact"
    );
    assert_eq!(who(&mut c, "/", &[("x-canary", "1")]).await, "canary");
    assert_eq!(who(&mut c, "/", &[("x-canary", "2")]).await, "stable");
    assert_eq!(
        who(&mut c, "/", &[("x-beta", ""), ("x-user", "alice")]).await,
        "canary"
    );
    assert_eq!(
        who(&mut c, "/", &[("x-beta", ""), ("x-user", "zoe")]).await,
        "stable",
        "the regex matches the whole value"
    );
    assert_eq!(who(&mut c, "/", &[("x-user", "alice")]).await, "stable");

    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..1000 {
        *counts.entry(who(&mut c, "/split", &[]).await).or_default() += 1;
    }
    let blue_share = shares(&counts, "blue");
    assert!((blue_share - 0.8).abs() < 0.05, "80/20 split: {counts:?}");

    // Every request to the stable route is copied to the shadow; the client sees stable's answer.
    let mirrored_before = shadow.requests();
    let stable_before = stable.requests();
    for _ in 0..10 {
        assert_eq!(who(&mut c, "/m", &[]).await, "stable");
    }
    assert_eq!(stable.requests() - stable_before, 10);
    assert!(
        wait_until_async(WAIT, || async { shadow.requests() - mirrored_before == 10 }).await,
        "the shadow got a copy of each: {}",
        shadow.requests() - mirrored_before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_sets_flipping_under_load_never_fail_a_request() {
    // Two pairs of endpoints take turns being healthy, many times a second, while clients send
    // requests: each request sees one snapshot (never a table of one set with the hosts of the
    // other), so none fails and both pairs serve.
    let origins = [
        Origin::start("a1").await,
        Origin::start("a2").await,
        Origin::start("b1").await,
        Origin::start("b2").await,
    ];
    let (listen, admin) = (free_addr(), free_addr());
    let endpoints: Vec<String> = origins.iter().map(|o| format!("\"{}\"", o.addr)).collect();
    let front = front(listen, admin, 2, "app");
    let _proxy = Proxy::start(&format!(
        r#"
{front}

[[cluster]]
name = "app"
lb_policy = "maglev"
hash_key = {{ header = "x-user" }}
endpoints = [{}]
health_check = {{ type = "http", path = "/healthz", interval = "20ms", timeout = "2s", unhealthy_threshold = 1, healthy_threshold = 1 }}
"#,
        endpoints.join(", ")
    ));
    let load = Load::start(listen, "/", Mode::KeepAlive, 4, Duration::from_secs(60));
    let version = |v: serde_json::Value| v["clusters"][0]["version"].as_u64().unwrap();
    let start_version = version(clusters(admin).await);
    let started = Instant::now();
    let mut flips = 0;
    while flips < 30 && started.elapsed() < Duration::from_secs(30) {
        let a_side = flips % 2 == 0;
        // Bring the other pair up first, then take this pair down: one pair is always healthy.
        for o in &origins[if a_side { 2..4 } else { 0..2 }] {
            o.fail_health(false);
        }
        let up = if a_side {
            &origins[2..4]
        } else {
            &origins[0..2]
        };
        assert!(
            wait_until_async(WAIT, || async {
                let mut all = true;
                for o in up {
                    all &= host(admin, "app", o.addr).await["healthy"] == true;
                }
                all
            })
            .await
        );
        let down = if a_side {
            &origins[0..2]
        } else {
            &origins[2..4]
        };
        for o in down {
            o.fail_health(true);
        }
        assert!(
            wait_until_async(WAIT, || async {
                let mut all = true;
                for o in down {
                    all &= host(admin, "app", o.addr).await["healthy"] == false;
                }
                all
            })
            .await
        );
        flips += 1;
    }
    let report = load.stop().await;
    let end_version = version(clusters(admin).await);
    assert!(flips >= 10, "flipped {flips} times");
    assert!(
        end_version >= start_version + 2 * flips as u64,
        "each flip published snapshots: {start_version} -> {end_version}"
    );
    assert_eq!(report.failures(), 0, "{report:?}");
    assert!(
        origins.iter().all(|o| o.requests() > 0),
        "every endpoint served"
    );
}

/// A port free on 127.0.0.2 and 127.0.0.3 both, for origins that one DNS name points at.
async fn origins_on_two_addresses() -> (Origin, Origin, u16) {
    loop {
        let port = baton_tests::free_port();
        let first: SocketAddr = ([127, 0, 0, 2], port).into();
        let second: SocketAddr = ([127, 0, 0, 3], port).into();
        if std::net::TcpListener::bind(first).is_ok() && std::net::TcpListener::bind(second).is_ok()
        {
            return (
                Origin::start_at("two", first).await,
                Origin::start_at("three", second).await,
                port,
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_dns_follows_the_answers_and_keeps_the_last_one_when_dns_fails() {
    use baton_tests::dns::{DnsServer, Failure};
    let dns = DnsServer::start().await;
    let (two, three, port) = origins_on_two_addresses().await;
    dns.set("app.test", vec![two.addr.ip()]);
    let (listen, admin) = (free_addr(), free_addr());
    let front = front(listen, admin, 1, "app");
    let _proxy = Proxy::start(&format!(
        r#"
{front}

[[cluster]]
name = "app"
discovery = "strict_dns"
endpoints = ["app.test:{port}"]
dns_resolvers = ["{}"]
dns_refresh_rate = "100ms"
"#,
        dns.addr()
    ));
    let members = || async {
        let all = clusters(admin).await;
        let mut hosts: Vec<String> = all["clusters"][0]["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["address"].as_str().unwrap().to_owned())
            .collect();
        hosts.sort();
        hosts
    };
    // The generation starts with the first answer already in.
    assert_eq!(members().await, [two.addr.to_string()]);
    let mut c = H1::connect(listen).await.unwrap();
    assert_eq!(c.get("/").await.unwrap().text(), "upstream two\n");

    // A second address: both serve.
    dns.set("app.test", vec![two.addr.ip(), three.addr.ip()]);
    let both = [two.addr.to_string(), three.addr.to_string()];
    assert!(wait_until_async(WAIT, || async { members().await == both }).await);
    let mut seen = HashMap::new();
    for _ in 0..10 {
        *seen.entry(c.get("/").await.unwrap().text()).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "both addresses serve: {seen:?}");

    // DNS fails (SERVFAIL, then silence): the last answer stays, requests go on.
    let failures_before = stat(admin, "update_failure{cluster=app}").await;
    dns.fail(Failure::ServFail);
    assert!(
        wait_until_async(WAIT, || async {
            stat(admin, "update_failure{cluster=app}").await >= failures_before + 3
        })
        .await
    );
    assert_eq!(members().await, both, "the last good answer is kept");
    for _ in 0..4 {
        assert_eq!(c.get("/").await.unwrap().status, 200);
    }

    // DNS answers again, without the second address: it goes (no health check vouches for it).
    dns.fail(Failure::None);
    dns.set("app.test", vec![three.addr.ip()]);
    assert!(
        wait_until_async(WAIT, || async {
            members().await == [three.addr.to_string()]
        })
        .await
    );
    for _ in 0..4 {
        assert_eq!(c.get("/").await.unwrap().text(), "upstream three\n");
    }
    assert!(stat(admin, "update_success{cluster=app}").await >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_keep_an_endpoint_that_dns_dropped_until_it_fails() {
    use baton_tests::dns::DnsServer;
    let dns = DnsServer::start().await;
    let (two, three, port) = origins_on_two_addresses().await;
    dns.set("app.test", vec![two.addr.ip(), three.addr.ip()]);
    let (listen, admin) = (free_addr(), free_addr());
    let front = front(listen, admin, 1, "app");
    let _proxy = Proxy::start(&format!(
        r#"
{front}

[[cluster]]
name = "app"
discovery = "strict_dns"
endpoints = ["app.test:{port}"]
dns_resolvers = ["{}"]
dns_refresh_rate = "100ms"
health_check = {{ type = "http", path = "/healthz", interval = "100ms", unhealthy_threshold = 1 }}
"#,
        dns.addr()
    ));
    assert!(wait_health(admin, "app", three.addr, true).await);
    dns.set("app.test", vec![two.addr.ip()]);
    assert!(
        wait_until_async(WAIT, || async {
            host(admin, "app", three.addr).await["health_flags"] == "/pending_dynamic_removal"
        })
        .await,
        "DNS dropped it, its health check keeps it"
    );
    let mut c = H1::connect(listen).await.unwrap();
    let mut from_three = 0;
    for _ in 0..10 {
        if c.get("/").await.unwrap().text() == "upstream three\n" {
            from_three += 1;
        }
    }
    assert_eq!(from_three, 5, "it still serves while it passes its checks");
    three.fail_health(true);
    assert!(
        wait_until_async(WAIT, || async {
            host(admin, "app", three.addr).await.is_null()
        })
        .await,
        "it goes once it fails"
    );
    for _ in 0..4 {
        assert_eq!(c.get("/").await.unwrap().text(), "upstream two\n");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_health_check_without_an_answer_decides_nothing() {
    // The cluster's endpoint is a listener of this same generation: its first health check runs
    // before the workers that would answer it, and times out. That must not mark it down.
    let (listen, upstream, admin) = (free_addr(), free_addr(), free_addr());
    let front = front(listen, admin, 0, "self");
    let _proxy = Proxy::start(&format!(
        r#"
{front}

[[listener]]
name = "upstream"
address = "{upstream}"
protocol = "http"
route = [{{ direct_response = {{ status = 200, body = "from upstream\n" }} }}]

[[cluster]]
name = "self"
endpoints = ["{upstream}"]
panic_threshold = 0
health_check = {{ type = "http", path = "/", interval = "300ms", timeout = "1s" }}
"#
    ));
    let r = client::get(listen, "/").await;
    assert_eq!(r.text(), "from upstream\n", "{r:?}");
    assert!(
        wait_until_async(WAIT, || async {
            host(admin, "self", upstream).await["health_flags"] == "healthy"
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_of_an_http2_cluster_speak_http2() {
    // An h2c-only endpoint passes; an HTTP/1.1-only one, which cannot answer HTTP/2, fails.
    let h2 = Origin::start_h2("h2").await;
    let h1 = Origin::start("h1").await;
    let (listen, admin) = (free_addr(), free_addr());
    let front = front(listen, admin, 0, "grpc");
    let _proxy = Proxy::start(&format!(
        r#"
{front}

[[cluster]]
name = "grpc"
protocol = "http2"
endpoints = ["{}", "{}"]
health_check = {{ type = "http", path = "/healthz", interval = "200ms", unhealthy_threshold = 1 }}
"#,
        h2.addr, h1.addr
    ));
    assert!(wait_health(admin, "grpc", h2.addr, true).await);
    assert!(
        wait_until_async(WAIT, || async {
            host(admin, "grpc", h1.addr).await["failed_active_health_check"] == true
        })
        .await
    );
    for _ in 0..4 {
        let r = client::get(listen, "/").await;
        assert_eq!(
            r.text(),
            "upstream h2\n",
            "only the healthy endpoint serves"
        );
    }
}

/// Sends requests on `conn` until `/clusters` shows `addr` ejected.
async fn send_until(conn: &mut H1, admin: SocketAddr, what: &str, addr: SocketAddr) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let _ = conn.get("/").await.unwrap();
        if host(admin, "app", addr).await["ejected"] == true {
            return;
        }
    }
    panic!("{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejection_refused_for_the_cap_happens_once_there_is_room() {
    // Three endpoints, at most one ejected at once. a and b both fail: a is ejected, b's
    // ejection is refused. Once a is back (and well), b's next run of failures ejects it.
    let (a, b, c) = (
        Origin::start("a").await,
        Origin::start("b").await,
        Origin::start("c").await,
    );
    let (listen, admin) = (free_addr(), free_addr());
    let front = front(listen, admin, 1, "app");
    let _proxy = Proxy::start(&format!(
        r#"
{front}

[[cluster]]
name = "app"
endpoints = ["{}", "{}", "{}"]
outlier_detection = {{ consecutive_5xx = 2, base_ejection_time = "1s", max_ejection_percent = 10 }}
"#,
        a.addr, b.addr, c.addr
    ));
    a.fail_with(Some(500));
    b.fail_with(Some(500));
    let mut conn = H1::connect(listen).await.unwrap();
    send_until(&mut conn, admin, "a is ejected", a.addr).await;
    assert!(
        wait_until_async(WAIT, || async {
            stat(admin, "outlier_ejections_overflow{cluster=app}").await >= 1 || {
                let _ = client::get(listen, "/").await;
                false
            }
        })
        .await,
        "b's ejection is refused while a is out"
    );
    a.fail_with(None);
    assert!(
        wait_health(admin, "app", a.addr, true).await,
        "a comes back"
    );
    send_until(&mut conn, admin, "b is ejected once there is room", b.addr).await;
    assert_eq!(host(admin, "app", a.addr).await["ejected"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_body_is_too_large_does_not_count_against_the_upstream() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start("a").await;
    let (listen, admin) = (free_addr(), free_addr());
    let _proxy = Proxy::start(&format!(
        r#"
[admin]
address = "{admin}"

[[listener]]
name = "public"
address = "{listen}"
protocol = "http"
max_request_body = "1KiB"
route = [{{ cluster = "app" }}]

[[cluster]]
name = "app"
endpoints = ["{}"]
outlier_detection = {{ consecutive_5xx = 2, base_ejection_time = "30s" }}
"#,
        origin.addr
    ));
    for _ in 0..3 {
        // Chunked: the proxy learns the body is too large only as it streams it upstream.
        let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
        s.write_all(b"POST /collect HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        let chunk = vec![b'x'; 4096];
        let _ = s.write_all(b"1000\r\n").await;
        let _ = s.write_all(&chunk).await;
        let _ = s.write_all(b"\r\n0\r\n\r\n").await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }
    let h = host(admin, "app", origin.addr).await;
    assert_eq!(h["ejected"], false, "{h}");
    assert_eq!(h["rq_error"], 0, "{h}");
    assert_eq!(client::get(listen, "/").await.text(), "upstream a\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_does_not_send_requests_to_an_endpoint_that_never_answers() {
    use baton_tests::supervisor::Supervisor;
    // A socket that listens and never accepts: connections open, nothing answers.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let good = Origin::start("good").await;
    let (listen, admin) = (free_addr(), free_addr());
    let front = front(listen, admin, 0, "app");
    let supervisor = Supervisor::start(&format!(
        r#"
{front}

[[cluster]]
name = "app"
endpoints = ["{hole_addr}", "{}"]
request_timeout = "2s"
health_check = {{ type = "http", path = "/healthz", interval = "1s", timeout = "300ms" }}
"#,
        good.addr
    ));
    for round in 0..2 {
        // Right after the start (and after the reload), the hole is already known down.
        assert_eq!(
            host(admin, "app", hole_addr).await["health_flags"],
            "/failed_active_hc",
            "round {round}"
        );
        for _ in 0..6 {
            let r = client::get(listen, "/").await;
            assert_eq!(r.text(), "upstream good\n", "round {round}");
        }
        if round == 0 {
            let out = supervisor.reload();
            assert_eq!(out.code, Some(0), "{out:?}");
        }
    }
    drop(hole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_body_is_kept_and_sent_again_a_large_one_goes_once() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    a.fail_with(Some(503));
    let (listen, admin) = (free_addr(), free_addr());
    let _proxy = Proxy::start(&format!(
        r#"
concurrency = 1
[admin]
address = "{admin}"

[[listener]]
name = "public"
address = "{listen}"
protocol = "http"
route = [{{ cluster = "app", retry = {{ retry_on = ["503"], num_retries = 2 }} }}]

[[cluster]]
name = "app"
endpoints = ["{}", "{}"]
"#,
        a.addr, b.addr
    ));
    let mut c = H1::connect(listen).await.unwrap();
    let small = "x".repeat(10_000);
    for _ in 0..4 {
        let r = c
            .send(request("PUT", "app.test", "/echo", small.clone()))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.text(),
            small,
            "the body came whole to the second endpoint"
        );
    }
    assert!(a.requests() >= 2, "round robin sent some first tries to a");
    assert!(stat(admin, "upstream_rq_retry_success{cluster=app}").await >= 2);

    // Over 64 KiB: streamed, tried once, so a's 503 reaches the client.
    let large = "y".repeat(100_000);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        // A connection each: an answer that comes before the whole body may close it.
        let mut c = H1::connect(listen).await.unwrap();
        let r = c
            .send(request("PUT", "app.test", "/echo", large.clone()))
            .await
            .unwrap();
        statuses.push(r.status.as_u16());
        if r.status == 200 {
            assert_eq!(r.text().len(), large.len());
        }
    }
    // a answers 503 (or, closing on the body it did not read, resets: 502), and no retry hides it.
    assert!(
        statuses.iter().any(|s| *s == 503 || *s == 502) && statuses.contains(&200),
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_past_per_try_timeout_is_retried_elsewhere_and_the_last_is_a_504() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let (listen, admin) = (free_addr(), free_addr());
    let _proxy = Proxy::start(&format!(
        r#"
concurrency = 1
[admin]
address = "{admin}"

[[listener]]
name = "public"
address = "{listen}"
protocol = "http"

[[listener.route]]
cluster = "app"
timeout = "20s"
per_try_timeout = "300ms"
retry = {{ retry_on = ["reset"], num_retries = 1 }}

[[cluster]]
name = "app"
endpoints = ["{}", "{}"]
"#,
        a.addr, b.addr
    ));
    let mut conn = H1::connect(listen).await.unwrap();
    let started = Instant::now();
    let reply = conn.get("/slow/10000").await.unwrap();
    let took = started.elapsed();
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.text(), "upstream request timeout (per try)\n");
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(5),
        "two tries of 300 ms, not the origin's 10 s: {took:?}"
    );
    assert!(wait_until_async(WAIT, || async { a.requests() + b.requests() == 2 }).await);
    assert_eq!(
        (a.requests(), b.requests()),
        (1, 1),
        "the retry went to the other endpoint"
    );
    assert_eq!(stat(admin, "upstream_rq_timeout{cluster=app}").await, 1);
    assert_eq!(
        stat(admin, "upstream_rq_per_try_timeout{cluster=app}").await,
        2
    );
    assert_eq!(stat(admin, "upstream_rq_retry{cluster=app}").await, 1);
}
