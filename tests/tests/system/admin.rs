use baton_tests::client::{self, H1, request};
use baton_tests::free_addr;
use baton_tests::proxy::Proxy;
use baton_tests::upstream::Origin;

use crate::{http_config, stat};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_and_control_the_proxy() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let proxy =
        Proxy::start_with(&http_config(listen, admin, origin.addr), &["--epoch", "7"]).unwrap();

    let r = client::get(admin, "/ready").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "LIVE\n"));

    let info = client::get(admin, "/server_info").await;
    assert_eq!(info.header("content-type"), Some("application/json"));
    let info = info.json();
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        info["build_id"].as_str().is_some_and(|id| id.len() > 8),
        "{info}"
    );
    assert_eq!(info["epoch"], 7);
    assert_eq!(info["pid"], proxy.pid());
    assert_eq!(info["state"], "live");
    assert_eq!(info["instance"], "test");
    assert_eq!(info["concurrency"], 2);
    assert!(info["uptime_seconds"].is_u64());

    for _ in 0..3 {
        client::get(listen, "/x").await;
    }
    client::get(listen, "/slow/3000").await; // 504
    assert_eq!(stat(admin, "downstream_rq_total{listener=public}").await, 4);
    assert_eq!(
        stat(admin, "downstream_rq_2xx{listener=public,code_class=2xx}").await,
        3
    );
    assert_eq!(
        stat(admin, "downstream_rq_5xx{listener=public,code_class=5xx}").await,
        1
    );
    assert_eq!(stat(admin, "upstream_rq_timeout{cluster=origin}").await, 1);

    let mut c = H1::connect(admin).await.unwrap();
    let r = c
        .send(request("POST", "admin", "/healthcheck/fail", ""))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let r = c.get("/ready").await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (503, "FAILED_HEALTHCHECK\n")
    );
    assert_eq!(
        client::get(listen, "/still-serving").await.status,
        200,
        "traffic still flows"
    );
    let r = c
        .send(request("POST", "admin", "/healthcheck/ok", ""))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(c.get("/ready").await.unwrap().status, 200);

    let r = c.get("/healthcheck/fail").await.unwrap();
    assert_eq!(r.status, 405, "a state change needs POST");
    assert_eq!(r.header("allow"), Some("POST"));
    assert_eq!(
        c.get("/ready").await.unwrap().status,
        200,
        "the GET changed nothing"
    );
    let r = c
        .send(request("POST", "admin", "/drain_listeners", ""))
        .await
        .unwrap();
    assert_eq!(
        r.status, 409,
        "run alone, nothing would hold the sockets while drained"
    );
    assert!(r.text().contains("baton run"), "{}", r.text());
    assert_eq!(client::get(listen, "/still-serving").await.status, 200);
    let r = c.get("/nope").await.unwrap();
    assert_eq!(r.status, 404);
    assert!(c.get("/").await.unwrap().text().contains("/server_info"));
}
