use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use baton_tests::client::{self, H1};
use baton_tests::load::{Load, Mode};
use baton_tests::upstream::Origin;
use baton_tests::{free_addr, wait_until};

use crate::{WAIT, repo, shipped, tool};

/// A `runsv` process supervising a service folder; stopped with `sv exit` when dropped.
struct RunSv {
    child: Child,
    service: std::path::PathBuf,
}

impl Drop for RunSv {
    fn drop(&mut self) {
        let _ = Command::new("sv")
            .args(["-w", "15", "exit"])
            .arg(&self.service)
            .output();
        if !wait_until(WAIT, || matches!(self.child.try_wait(), Ok(Some(_)))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runit_runs_reloads_drains_and_restarts_baton() {
    let runsv = tool("runsv", "runit");
    let sv = tool("sv", "runit");
    let origin = Origin::start("origin").await;
    let listen = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let service = dir.path().join("baton");
    std::fs::create_dir(&service).unwrap();
    let config = dir.path().join("baton.toml");
    std::fs::write(
        &config,
        format!(
            r#"
drain_timeout = "10s"
epoch_header = true

[[listener]]
name = "public"
address = "{listen}"
protocol = "http"

[[listener.route]]
cluster = "origin"

[[cluster]]
name = "origin"
endpoints = ["{}"]
request_timeout = "10s"

[stats]
path = "stats.shm"

[supervisor]
control_socket = "baton.sock"
"#,
            origin.addr
        ),
    )
    .unwrap();
    // The shipped run and finish scripts, pointing at the binaries and config under test.
    use std::os::unix::fs::PermissionsExt;
    for script in ["run", "finish"] {
        let path = service.join(script);
        std::fs::write(&path, shipped(&format!("systemd/runit/{script}"), &config)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    assert!(repo("systemd/runit/run").is_file());
    let log = dir.path().join("runsv.log");
    let runsv = RunSv {
        child: Command::new(runsv)
            .arg(&service)
            .stdin(Stdio::null())
            .stdout(File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        service: service.clone(),
    };
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let sv = |command: &str| -> String {
        let out = baton_tests::blocking(|| {
            Command::new(&sv)
                .arg(command)
                .arg(&service)
                .output()
                .unwrap()
        });
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        wait_until(WAIT, || read_log().contains(" active epoch=0")),
        "{}",
        read_log()
    );
    assert!(sv("status").starts_with("run: "), "{}", sv("status"));

    // sv hup: a reload, under load, without a failure.
    let load = Load::start(listen, "/x", Mode::KeepAlive, 4, Duration::from_secs(120));
    assert!(wait_until(WAIT, || load.snapshot().ok > 50));
    sv("hup");
    assert!(
        wait_until(WAIT, || read_log().contains(" active epoch=1")),
        "{}",
        read_log()
    );
    let start = load.snapshot().ok;
    assert!(wait_until(WAIT, || load.snapshot().ok > start + 50));
    let report = load.stop().await;
    assert_eq!(report.failures(), 0, "{report:?}\n{}", read_log());

    // sv down: a graceful drain; the request in flight completes.
    let mut slow = H1::connect(listen).await.unwrap();
    let in_flight = tokio::spawn(async move { slow.get("/slow/1500").await });
    assert!(wait_until(WAIT, || origin.requests() > report.ok as usize));
    sv("down");
    let r = in_flight
        .await
        .unwrap()
        .expect("the request in flight completes");
    assert_eq!(r.status, 200);
    assert!(
        wait_until(WAIT, || sv("status").starts_with("down: ")),
        "{}",
        sv("status")
    );
    assert!(
        read_log().contains("baton exited: status 0"),
        "the finish script ran: {}",
        read_log()
    );

    // sv up: serving again.
    sv("up");
    assert!(wait_until(WAIT, || sv("status").starts_with("run: ")));
    assert!(
        baton_tests::wait_until_async(WAIT, || async {
            tokio::net::TcpStream::connect(listen).await.is_ok()
        })
        .await
    );
    assert_eq!(client::get(listen, "/again").await.status, 200);

    // sv kill: SIGKILL to baton itself, under load. runit starts it again, and it adopts the
    // generation the killed one left serving: nothing is refused or fails meanwhile.
    let socket = dir.path().join("baton.sock");
    let active = || -> Option<u64> {
        let out = Command::new(baton_tests::binaries::supervisor())
            .args(["status", "--json", "--socket"])
            .arg(&socket)
            .output()
            .ok()?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        status["generations"]
            .as_array()?
            .iter()
            .find(|g| g["state"] == "active")
            .and_then(|g| g["pid"].as_u64())
    };
    let generation = baton_tests::blocking(active).expect("an active generation");
    let load = Load::start(listen, "/x", Mode::PerRequest, 2, Duration::from_secs(120));
    assert!(wait_until(WAIT, || load.snapshot().ok > 20));
    sv("kill");
    assert!(
        wait_until(WAIT, || read_log()
            .contains("adopted the active generation")),
        "{}",
        read_log()
    );
    assert_eq!(
        baton_tests::blocking(active),
        Some(generation),
        "the same generation, adopted"
    );
    let start = load.snapshot().ok;
    assert!(wait_until(WAIT, || load.snapshot().ok > start + 20));
    let report = load.stop().await;
    assert_eq!(report.failures(), 0, "{report:?}\n{}", read_log());
    drop(runsv);
}
