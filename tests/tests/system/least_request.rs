use std::collections::HashMap;
use std::net::SocketAddr;

use baton_tests::client::{self, H1};
use baton_tests::proxy::Proxy;
use baton_tests::upstream::Origin;
use baton_tests::{free_addr, wait_until_async};

use crate::WAIT;

/// The `/clusters` entry of `addr` in cluster `least`.
async fn host(admin: SocketAddr, addr: SocketAddr) -> serde_json::Value {
    let all = client::get(admin, "/clusters?format=json").await.json();
    all["clusters"][0]["hosts"]
        .as_array()
        .unwrap_or_else(|| panic!("no hosts in {all}"))
        .iter()
        .find(|h| h["address"] == addr.to_string())
        .cloned()
        .unwrap_or_else(|| panic!("no host {addr} in {all}"))
}

async fn wait_healthy(admin: SocketAddr, addr: SocketAddr, healthy: bool) {
    assert!(
        wait_until_async(WAIT, || async {
            host(admin, addr).await["healthy"] == healthy
        })
        .await,
        "{addr} never became healthy={healthy}"
    );
}

/// Sends `n` requests one after the other on `conn`: how many each origin answered.
async fn sequential(conn: &mut H1, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let r = conn.get("/").await.expect("an answer");
        assert_eq!(r.status, 200, "{}", r.text());
        let name = r.header("x-upstream-name").expect("x-upstream-name");
        *counts.entry(name.to_owned()).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_least_request_follows_the_weights_and_moves_off_a_loaded_endpoint() {
    let (heavy, light) = (Origin::start("heavy").await, Origin::start("light").await);
    let (listen, admin) = (free_addr(), free_addr());
    let (h, l) = (heavy.addr, light.addr);
    let _proxy = Proxy::start(&format!(
        r#"
concurrency = 2
[admin]
address = "{admin}"

[[listener]]
name = "public"
address = "{listen}"
protocol = "http"
route = [{{ cluster = "least" }}]

[[cluster]]
name = "least"
lb_policy = "least_request"
endpoints = ["{h} weight=2", "{l} weight=1"]
request_timeout = "30s"
panic_threshold = 0
health_check = {{ type = "http", path = "/healthz", interval = "50ms", timeout = "1s", unhealthy_threshold = 1, healthy_threshold = 1 }}
"#
    ));
    wait_healthy(admin, h, true).await;
    wait_healthy(admin, l, true).await;

    // One request at a time, so nothing is in flight when the next is balanced: the endpoints
    // share by weight, two in three to the heavier (the heavier used to take every one).
    let mut conn = H1::connect(listen).await.unwrap();
    let counts = sequential(&mut conn, 300).await;
    let to_heavy = counts.get("heavy").copied().unwrap_or(0);
    assert!(
        (180..=220).contains(&to_heavy),
        "weights 2:1 with no load: {counts:?}"
    );

    // Four requests held at the heavier endpoint (the lighter is out of the cluster while they
    // are sent, so that they all go there)...
    light.fail_health(true);
    wait_healthy(admin, l, false).await;
    let held: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = H1::connect(listen).await.unwrap();
                c.get("/gate/5").await.expect("an answer")
            })
        })
        .collect();
    assert!(
        wait_until_async(WAIT, || async { host(admin, h).await["rq_active"] == 4 }).await,
        "the four held requests never reached the heavier endpoint"
    );
    light.fail_health(false);
    wait_healthy(admin, l, true).await;

    // ...weigh it 2/5 against the lighter's 1: new requests go mostly to the lighter one (2 in
    // 7 to the heavier), and the heavier is not starved.
    let counts = sequential(&mut conn, 140).await;
    let to_heavy = counts.get("heavy").copied().unwrap_or(0);
    let to_light = counts.get("light").copied().unwrap_or(0);
    assert!(
        (20..=60).contains(&to_heavy) && to_light > 2 * to_heavy,
        "the heavier endpoint with 4 in flight: {counts:?}"
    );

    // The fifth request at the gate, sent to the origin itself, lets the held ones go.
    let opened = client::get(h, "/gate/5").await;
    assert_eq!(opened.status, 200, "{}", opened.text());
    for held in held {
        let r = held.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "gate open\n");
    }
}
