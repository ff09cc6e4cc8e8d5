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

/// Connections to the admin address cannot take the descriptors the listeners need: past 64
/// open ones a new one is closed at once, and one that never finishes its request's head is
/// closed after 10 s, while the public listener answers throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_slow_admin_connections_is_capped_and_timed_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let _proxy = Proxy::start(&http_config(listen, admin, origin.addr));

    let mut slow = Vec::new();
    for _ in 0..100 {
        let mut c = tokio::net::TcpStream::connect(admin).await.unwrap();
        c.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(c);
    }
    // Those past the cap are closed as soon as the admin accepts them: reading gives the end of
    // the stream (well before the 10 s header timeout could close any).
    let started = std::time::Instant::now();
    let mut ended = vec![false; slow.len()];
    while ended.iter().filter(|e| **e).count() < 100 - 64
        && started.elapsed() < std::time::Duration::from_secs(5)
    {
        for (c, ended) in slow.iter_mut().zip(ended.iter_mut()).filter(|(_, e)| !**e) {
            let mut byte = [0u8; 1];
            if let Ok(Ok(0)) =
                tokio::time::timeout(std::time::Duration::from_millis(5), c.read(&mut byte)).await
            {
                *ended = true;
            }
        }
    }
    assert_eq!(
        ended.iter().filter(|e| **e).count(),
        100 - 64,
        "all but 64 closed at once"
    );
    assert_eq!(client::get(listen, "/x").await.status, 200);

    // The 64 left never finish their heads: each is closed by the header timeout.
    let started = std::time::Instant::now();
    for c in &mut slow {
        let mut byte = [0u8; 1];
        let end = tokio::time::timeout(crate::WAIT, c.read(&mut byte)).await;
        assert!(
            matches!(end, Ok(Ok(0)) | Ok(Err(_))),
            "a slow admin connection still open after {:?}",
            started.elapsed()
        );
    }
    let r = client::get(admin, "/ready").await;
    assert_eq!(r.status, 200, "the admin answers again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_info_names_the_config_by_its_absolute_path() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let proxy = Proxy::start_from_its_folder(&http_config(listen, admin, origin.addr));
    let info = client::get(admin, "/server_info").await.json();
    let shown = info["config"].as_str().unwrap().to_owned();
    assert!(
        std::path::Path::new(&shown).is_absolute(),
        "started as `--config baton.toml`: {shown}"
    );
    assert_eq!(
        std::fs::canonicalize(&shown).unwrap(),
        std::fs::canonicalize(&proxy.config_path).unwrap()
    );
}
