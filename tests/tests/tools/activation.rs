use std::fs::File;
use std::process::{Command, Stdio};
use std::time::Duration;

use baton_tests::client;
use baton_tests::load::{Load, Mode};
use baton_tests::upstream::Origin;
use baton_tests::{free_addr, wait_until};

use crate::{WAIT, tool};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_serves_on_the_passed_socket_and_reloads_under_load() {
    let activate = tool("systemd-socket-activate", "systemd");
    let origin = Origin::start("origin").await;
    let (listen, spare) = (free_addr(), free_addr());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.toml");
    std::fs::write(
        &config,
        format!(
            r#"
drain_timeout = "2s"
epoch_header = true

[[listener]]
name = "public"
fd_name = "public"
protocol = "http"

[[listener.route]]
cluster = "origin"

[[cluster]]
name = "origin"
endpoints = ["{}"]

[stats]
path = "stats.shm"

[supervisor]
control_socket = "baton.sock"
"#,
            origin.addr
        ),
    )
    .unwrap();
    let log = dir.path().join("baton.log");
    // systemd binds both sockets and starts baton on the first connection; `spare` is passed
    // too but no listener names it.
    let mut child = Command::new(activate)
        .args([
            "-l",
            &listen.to_string(),
            "-l",
            &spare.to_string(),
            "--fdname=public:spare",
        ])
        .args(["-E", "BATON_LOG=info"])
        .arg(baton_tests::binaries::supervisor())
        .args(["run", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(WAIT, || read_log().contains("Listening on")),
        "{}",
        read_log()
    );

    // The first connection starts baton, and is served by it.
    let first = client::get(listen, "/first").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-baton-epoch"), Some("0"));
    // The generation serves as soon as its workers run; the supervisor logs what it did with
    // the sockets once it has taken the generation's `Ready`, which may come a moment later.
    assert!(
        wait_until(WAIT, || read_log()
            .contains("systemd passed a socket that no listener uses")),
        "{}",
        read_log()
    );
    let logged = read_log();
    assert!(
        logged.contains("listen socket from systemd") && logged.contains("name=\"public\""),
        "{logged}"
    );

    let socket = dir.path().join("baton.sock");
    let baton = |command: &str| {
        baton_tests::blocking(|| {
            Command::new(baton_tests::binaries::supervisor())
                .args([command, "--socket"])
                .arg(&socket)
                .output()
                .unwrap()
        })
    };
    let load = Load::start(listen, "/x", Mode::KeepAlive, 4, Duration::from_secs(120));
    assert!(wait_until(WAIT, || load.snapshot().ok > 50));
    for _ in 0..5 {
        assert!(baton("reload").status.success(), "{}", read_log());
        let start = load.snapshot().ok;
        assert!(wait_until(WAIT, || load.snapshot().ok > start + 20));
    }
    let report = load.stop().await;
    assert_eq!(report.failures(), 0, "{report:?}\n{}", read_log());
    assert!(report.epochs.len() >= 2, "{:?}", report.epochs);

    assert!(baton("stop").status.success());
    assert!(
        wait_until(WAIT, || matches!(child.try_wait(), Ok(Some(_)))),
        "baton stops"
    );
}

/// A restart of the service under systemd gets the sockets back from the fd store, in
/// `LISTEN_FDS`, named after their keys: the new supervisor serves on them instead of binding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_come_back_from_the_fd_store() {
    let activate = tool("systemd-socket-activate", "systemd");
    let listen = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.toml");
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nname = \"l\"\naddress = \"{listen}\"\nprotocol = \"http\"\n[[listener.route]]\ndirect_response = {{ status = 200, body = \"from the stored socket\\n\" }}\n[stats]\npath = \"stats.shm\"\n[supervisor]\ncontrol_socket = \"baton.sock\"\n"
        ),
    )
    .unwrap();
    let log = dir.path().join("baton.log");
    let name = format!("--fdname=baton_tcp_{}_{}", listen.ip(), listen.port());
    let mut child = Command::new(activate)
        .args(["-l", &listen.to_string(), &name])
        .args(["-E", "BATON_LOG=info"])
        .arg(baton_tests::binaries::supervisor())
        .args(["run", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(WAIT, || read_log().contains("Listening on")),
        "{}",
        read_log()
    );
    let r = client::get(listen, "/").await;
    assert_eq!(r.text(), "from the stored socket\n");
    let logged = read_log();
    assert!(
        logged
            .lines()
            .any(|l| l.ends_with(&format!("listen socket from systemd key=tcp:{listen}"))),
        "{logged}"
    );
    assert!(
        !logged.contains("stored a new listen socket"),
        "it was not bound again: {logged}"
    );
    let stop = Command::new(baton_tests::binaries::supervisor())
        .args(["stop", "--socket"])
        .arg(dir.path().join("baton.sock"))
        .output()
        .unwrap();
    assert!(stop.status.success());
    assert!(wait_until(WAIT, || matches!(child.try_wait(), Ok(Some(_)))));
}
