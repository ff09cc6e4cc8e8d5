//! The examples' helpers under the real tools: `examples/make-cert.sh` (openssl) makes a pair
//! the TLS example accepts, and `examples/logrotate.d/baton` (logrotate) rotates a running
//! baton's access log, which then writes on into a new file; the socket activation example
//! serves on the socket `systemd-socket-activate` passes.

use std::process::Command;

use baton_tests::client;
use baton_tests::config::Edit;
use baton_tests::supervisor::Supervisor;
use baton_tests::{free_addr, wait_until};

use crate::{WAIT, repo, shipped, tool};

#[test]
fn make_cert_makes_a_pair_the_tls_example_accepts() {
    tool("openssl", "openssl");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(repo("examples/make-cert.sh"))
        .arg(dir.path().join("tls"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = dir.path().join("tls.toml");
    std::fs::copy(repo("examples/tls.toml"), &config).unwrap();
    let out = Command::new(baton_tests::binaries::supervisor())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "baton check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_logrotate_snippet_rotates_and_baton_writes_on_in_a_new_file() {
    let logrotate = tool("logrotate", "logrotate");
    let listen = free_addr();
    // The access log in a `log` folder beside the config (written first, with the config).
    let supervisor = Supervisor::start_with_files(
        &format!(
            r#"
[[listener]]
name = "public"
address = "{listen}"
protocol = "http"
access_log = "log/access.log"

[[listener.route]]
direct_response = {{ status = 200, body = "ok\n" }}
"#
        ),
        &[("log/.keep", b"")],
    );
    let logs = supervisor.dir().join("log");
    let conf = supervisor.dir().join("logrotate.conf");
    std::fs::write(
        &conf,
        shipped("examples/logrotate.d/baton", &supervisor.config_path)
            .edit("/var/log/baton", &logs.display().to_string()),
    )
    .unwrap();
    let lines = |file: &str| std::fs::read_to_string(logs.join(file)).unwrap_or_default();

    assert_eq!(client::get(listen, "/before").await.status, 200);
    assert!(wait_until(WAIT, || lines("access.log").contains("GET /before")));
    let out = Command::new(logrotate)
        .arg("--force")
        .arg("--state")
        .arg(supervisor.dir().join("logrotate.state"))
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "logrotate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(lines("access.log.1").contains("GET /before"));

    // The postrotate's `baton reopen-logs` made the generation open access.log anew.
    assert_eq!(client::get(listen, "/after").await.status, 200);
    assert!(
        wait_until(WAIT, || lines("access.log").contains("GET /after")),
        "access.log: {:?}, access.log.1: {:?}\n{}",
        lines("access.log"),
        lines("access.log.1"),
        supervisor.log()
    );
    assert!(!lines("access.log").contains("GET /before"));
    assert!(!lines("access.log.1").contains("GET /after"));
}

/// `examples/socket-activation.toml` as systemd runs it: the port bound by
/// `systemd-socket-activate` (as `systemd/baton.socket` would), passed as `public`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_activation_example_serves_on_the_socket_systemd_passes() {
    let activate = tool("systemd-socket-activate", "systemd");
    let origin = baton_tests::upstream::Origin::start("app").await;
    let (listen, admin) = (free_addr(), free_addr());
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("log")).unwrap();
    let config = dir.path().join("baton.toml");
    let example = std::fs::read_to_string(repo("examples/socket-activation.toml")).unwrap();
    std::fs::write(
        &config,
        format!(
            "{}\n[stats]\npath = \"stats.shm\"\n\n[supervisor]\ncontrol_socket = \"baton.sock\"\n",
            example
                .edit("127.0.0.1:3000", &origin.addr.to_string())
                .edit("127.0.0.1:9901", &admin.to_string())
                .edit_all(
                    "/var/log/baton",
                    &dir.path().join("log").display().to_string()
                )
        ),
    )
    .unwrap();
    let log = dir.path().join("baton.log");
    let mut child = Command::new(activate)
        .args(["-l", &listen.to_string(), "--fdname=public"])
        .args(["-E", "BATON_LOG=info"])
        .arg(baton_tests::binaries::supervisor())
        .args(["run", "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(WAIT, || read_log().contains("Listening on")),
        "{}",
        read_log()
    );

    let reply = client::get(listen, "/from-systemd").await;
    assert_eq!(reply.status, 200, "{reply:?}\n{}", read_log());
    let access = dir.path().join("log/access.log");
    assert!(
        wait_until(WAIT, || std::fs::read_to_string(&access)
            .is_ok_and(|l| l.contains("\"GET /from-systemd HTTP/1.1\" 200 ")
                && l.contains(&format!(" {} - ", origin.addr)))),
        "{}",
        read_log()
    );

    let stop = Command::new(baton_tests::binaries::supervisor())
        .args(["stop", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    assert!(
        wait_until(WAIT, || matches!(child.try_wait(), Ok(Some(_)))),
        "baton stops"
    );
}
