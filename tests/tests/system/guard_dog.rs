use baton_tests::client::{self, H1, request};
use baton_tests::config::Edit;
use baton_tests::free_addr;
use baton_tests::proxy::Proxy;
use baton_tests::supervisor::Supervisor;
use baton_tests::upstream::Origin;
use baton_tests::wait_until_async;

use crate::{WAIT, http_config, stat};

/// Asks a debug build's admin to block worker 0's thread for `ms` milliseconds.
async fn wedge(admin: std::net::SocketAddr, ms: u64) {
    let mut c = H1::connect(admin).await.unwrap();
    let r = c
        .send(request(
            "POST",
            "admin",
            &format!("/debug/wedge?worker=0&ms={ms}"),
            "",
        ))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_worker_is_counted_and_logged_and_the_proxy_serves_on() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let config = format!(
        "{}\n[guard_dog]\nmiss_timeout = \"300ms\"\nmega_miss_timeout = \"600ms\"\nkill_timeout = \"0s\"\n",
        http_config(listen, admin, origin.addr)
    );
    let proxy = Proxy::start(&config);
    assert_eq!(client::get(listen, "/before").await.status, 200);
    // A loaded machine may stall a debug build now and then: count from here.
    let misses = stat(admin, "server.watchdog_miss").await;
    let mega_misses = stat(admin, "server.watchdog_mega_miss").await;

    wedge(admin, 2000).await;
    let counted = wait_until_async(WAIT, || async {
        stat(admin, "server.watchdog_mega_miss").await > mega_misses
    })
    .await;
    assert!(counted, "{}", proxy.log());
    assert!(proxy.wait_for_log("has not run its event loop for", WAIT));
    assert!(stat(admin, "server.watchdog_miss").await > misses);
    // Once the worker runs again, it serves as before: the kill is off.
    let mut c = H1::connect(listen).await.unwrap();
    for _ in 0..4 {
        let r = c
            .send(request("GET", "x.test", "/after", ""))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    assert!(proxy.log().contains("wedging this worker"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_worker_aborts_its_generation_and_the_supervisor_replaces_it() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let config = format!(
        "instance = \"wedge\"\nepoch_header = true\n{}\n[guard_dog]\nmiss_timeout = \"300ms\"\nmega_miss_timeout = \"1s\"\nkill_timeout = \"3s\"\n",
        http_config(listen, admin, origin.addr).without("instance = \"test\"")
    );
    let supervisor = Supervisor::start(&config);
    assert_eq!(
        client::get(listen, "/before").await.header("x-baton-epoch"),
        Some("0")
    );

    wedge(admin, 60_000).await;
    let replaced =
        wait_until_async(WAIT, || async { supervisor.status()["active_epoch"] == 1 }).await;
    assert!(replaced, "{}", supervisor.log());
    assert_eq!(supervisor.status()["crashes"], 1);
    assert!(
        supervisor.log().contains("has not run its event loop"),
        "{}",
        supervisor.log()
    );
    assert_eq!(
        client::get(listen, "/after").await.header("x-baton-epoch"),
        Some("1"),
        "the replacement serves on the same sockets"
    );
    // The wedged generation's counts were kept when the supervisor retired its rows.
    assert!(stat(admin, "server.watchdog_mega_miss").await >= 1);
}
