use std::net::SocketAddr;
use std::time::Duration;

use baton_tests::client::{self, H1};
use baton_tests::config::Edit;
use baton_tests::load::{Load, Mode};
use baton_tests::supervisor::{Options, Supervisor};
use baton_tests::upstream::{Origin, TcpEcho};
use baton_tests::{free_addr, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::WAIT;

/// Longest any load in these tests may run; each stops earlier by itself when the test is done.
const LOAD_LIMIT: Duration = Duration::from_secs(120);

fn config(listen: SocketAddr, admin: SocketAddr, origin: SocketAddr, extra: &str) -> String {
    format!(
        r#"
instance = "reload"
concurrency = 2
epoch_header = true
drain_timeout = "2s"
drain_idle_grace = "500ms"
{extra}

[admin]
address = "{admin}"

[[listener]]
name = "public"
address = "{listen}"
protocol = "http"

[[listener.route]]
cluster = "origin"

[[cluster]]
name = "origin"
endpoints = ["{origin}"]
"#
    )
}

/// Waits until the load has had `more` more answers: the system is serving between steps.
async fn answered(load: &Load, more: u64) {
    let served = load.answered(more, WAIT).await;
    assert!(served, "the load stalled: {:?}", load.snapshot());
}

async fn reloads_under_load_lose_nothing(mode: Mode) {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let supervisor = Supervisor::start(&config(listen, admin, origin.addr, ""));
    let load = Load::start(listen, "/x", mode, 4, LOAD_LIMIT);
    answered(&load, 50).await;
    for i in 0..20 {
        let out = supervisor.reload();
        assert_eq!(
            out.code,
            Some(0),
            "reload {i}: {}{}",
            out.stdout,
            out.stderr
        );
        assert!(
            out.stdout
                .contains(&format!("generation {} is active", i + 1)),
            "{}",
            out.stdout
        );
        answered(&load, 20).await;
    }
    let report = load.stop().await;
    assert_eq!(report.failures(), 0, "{report:?}\n{}", supervisor.log());
    assert!(report.ok > 400, "{report:?}");
    assert!(
        report.epochs.len() >= 3,
        "answers from at least 3 generations: {:?}",
        report.epochs
    );
    assert!(
        !report.epochs.contains_key("-"),
        "every answer names its generation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_keep_alive_load_lose_no_request() {
    reloads_under_load_lose_nothing(Mode::KeepAlive).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_connection_per_request_load_lose_no_request() {
    reloads_under_load_lose_nothing(Mode::PerRequest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_tcp_sessions_in_flight_survive_a_reload() {
    let origin = Origin::start("origin").await;
    let echo = TcpEcho::start().await;
    let (listen, admin, l4) = (free_addr(), free_addr(), free_addr());
    let extra = format!(
        "{}\n[[listener]]\nname = \"l4\"\naddress = \"{l4}\"\nprotocol = \"tcp\"\ncluster = \"echo\"\n\n[[cluster]]\nname = \"echo\"\nendpoints = [\"{}\"]\n",
        config(listen, admin, origin.addr, "")
            .edit("drain_timeout = \"2s\"", "drain_timeout = \"10s\""),
        echo.addr
    );
    let supervisor = Supervisor::start(&extra);

    let mut slow = H1::connect(listen).await.unwrap();
    let in_flight = tokio::spawn(async move { slow.get("/slow/2000").await });
    let mut session = TcpStream::connect(l4).await.unwrap();
    let mut buf = [0u8; 5];
    session.write_all(b"first").await.unwrap();
    session.read_exact(&mut buf).await.unwrap();
    assert!(wait_until(WAIT, || origin.requests() == 1));

    let out = supervisor.reload();
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let r = in_flight
        .await
        .unwrap()
        .expect("the request in flight completes");
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "slow done\n"));
    assert_eq!(
        r.header("x-baton-epoch"),
        Some("0"),
        "answered by the old generation"
    );
    // The TCP session opened before the reload keeps flowing.
    session.write_all(b"after").await.unwrap();
    session.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after");
    assert_eq!(
        client::get(listen, "/new").await.header("x-baton-epoch"),
        Some("1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_a_broken_config_fails_and_changes_nothing() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let good = config(listen, admin, origin.addr, "");
    let supervisor = Supervisor::start(&good);
    let load = Load::start(listen, "/x", Mode::KeepAlive, 2, LOAD_LIMIT);
    answered(&load, 20).await;

    supervisor.write_config(&good.edit_all("address = \"127.0.0.1", "adress = \"127.0.0.1"));
    let out = supervisor.reload();
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("baton.toml:"),
        "the error names the line: {}\n{}",
        out.stderr,
        supervisor.log()
    );
    assert!(
        out.stderr.contains("unknown field `adress`"),
        "{}",
        out.stderr
    );
    answered(&load, 20).await;
    let generations = supervisor.generations();
    assert_eq!(generations.len(), 1, "{generations:?}");
    assert_eq!((generations[0].0, generations[0].2.as_str()), (0, "active"));
    let status = supervisor.command("status", &[]);
    assert!(
        status.stdout.contains("last reload: failed: "),
        "{}",
        status.stdout
    );

    supervisor.write_config(&good);
    assert_eq!(supervisor.reload().code, Some(0), "the next reload works");
    answered(&load, 20).await;
    let report = load.stop().await;
    assert_eq!(report.failures(), 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_replaced_on_disk_is_picked_up_by_the_next_reload() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let binary = std::fs::read(baton_tests::binaries::proxy()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("bin")).unwrap();
    let installed = dir.path().join("bin/baton-proxy");
    baton_tests::write_executable(&installed, &binary);
    let supervisor = Supervisor::start(&format!(
        "{}\n[supervisor]\ncontrol_socket = \"baton.sock\"\nproxy_binary = \"{}\"\n",
        config(listen, admin, origin.addr, ""),
        installed.display()
    ));
    let before = client::get(admin, "/server_info").await.json()["build_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Replace it the way a package manager does: write a new file, rename it over the old one.
    let staged = dir.path().join("bin/.baton-proxy.new");
    baton_tests::write_executable(&staged, &baton_tests::rebuilt(&binary, &before));
    std::fs::rename(&staged, &installed).unwrap();

    assert_eq!(supervisor.reload().code, Some(0));
    let after = client::get(admin, "/server_info").await.json();
    assert_eq!(after["epoch"], 1);
    let after = after["build_id"].as_str().unwrap().to_owned();
    assert_ne!(after, before, "the new generation runs the new binary");
    let status = supervisor.command("status", &[]);
    assert!(status.stdout.contains(&after), "{}", status.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_generation_is_replaced_and_loses_only_what_it_had_in_flight() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let supervisor = Supervisor::start(&config(listen, admin, origin.addr, ""));
    let keep_alive = Load::start(listen, "/x", Mode::KeepAlive, 4, LOAD_LIMIT);
    let per_request = Load::start(listen, "/x", Mode::PerRequest, 2, LOAD_LIMIT);
    answered(&keep_alive, 50).await;
    answered(&per_request, 20).await;

    let victim = supervisor.active_pid().expect("an active generation");
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    assert!(
        wait_until(WAIT, || supervisor
            .active_pid()
            .is_some_and(|pid| pid != victim)),
        "a replacement became active:\n{}",
        supervisor.log()
    );
    answered(&keep_alive, 50).await;
    answered(&per_request, 20).await;
    let (a, b) = (keep_alive.stop().await, per_request.stop().await);
    assert_eq!(
        a.refused + b.refused,
        0,
        "no connection is refused: {a:?} {b:?}"
    );
    // At most one request per client was on the killed process.
    assert!(a.failures() <= 4 && b.failures() <= 2, "{a:?} {b:?}");
    assert!(supervisor.log().contains("killed by signal 9 (SIGKILL)"));
    let status = supervisor.status();
    assert_eq!(status["crashes"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_never_go_back_across_reloads_and_a_crash() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let supervisor = Supervisor::start(&config(listen, admin, origin.addr, ""));
    let region = supervisor.dir().join("stats.shm");
    let read = || -> u64 {
        let (code, out, err) =
            baton_tests::baton_stats(&["--path", region.to_str().unwrap(), "^downstream_rq_total"]);
        assert_eq!(code, Some(0), "{err}");
        out.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{out}"))
    };
    let mut sent = 0u64;
    let mut last = 0u64;
    for round in 0..11 {
        for _ in 0..5 {
            assert_eq!(client::get(listen, "/c").await.status, 200);
            sent += 1;
        }
        assert!(
            wait_until(WAIT, || read() == sent),
            "round {round}: {} != {sent}",
            read()
        );
        if round == 10 {
            // Nothing is in flight: a crash now loses no request, and must lose no count.
            let victim = supervisor.active_pid().unwrap();
            kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
            assert!(wait_until(WAIT, || supervisor
                .active_pid()
                .is_some_and(|pid| pid != victim)));
        } else {
            assert_eq!(supervisor.reload().code, Some(0));
        }
        let now = read();
        assert!(now >= last, "the counter went back from {last} to {now}");
        last = now;
    }
    for _ in 0..5 {
        client::get(listen, "/c").await;
        sent += 1;
    }
    assert!(wait_until(WAIT, || read() == sent), "{} != {sent}", read());
    let (_, out, _) =
        baton_tests::baton_stats(&["--path", region.to_str().unwrap(), "^supervisor"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("supervisor.reloads_total") && l.ends_with(" 10")),
        "ten reloads (the first start is not one): {out}"
    );
    assert!(
        out.contains("supervisor.generation_crashes_total")
            && out
                .lines()
                .any(|l| l.starts_with("supervisor.generation_crashes_total") && l.ends_with(" 1")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_that_hangs_or_dies_while_starting_does_not_block_reloads() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let good = config(listen, admin, origin.addr, "");
    let dir = tempfile::tempdir().unwrap();
    // The control socket beside the config, where the harness looks for it.
    let with_timeout = |c: &str| {
        format!("{c}\n[supervisor]\ncontrol_socket = \"baton.sock\"\nreadiness_timeout = \"2s\"\n")
    };
    let supervisor = Supervisor::start(&with_timeout(&good));
    // A certificate that is a FIFO: reading the config blocks until someone writes to it, so a
    // generation started with it hangs in its start-up.
    let fifo = dir.path().join("hang.pem");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let hanging = good.edit(
        "[[listener.route]]",
        &format!(
            "[[listener.tls.certificate]]\ncert = \"{}\"\nkey = \"{}\"\n\n[[listener.route]]",
            fifo.display(),
            fifo.display()
        ),
    );

    // 1. Killed while starting.
    supervisor.write_config(&with_timeout(&hanging));
    let socket_path = supervisor.socket.clone();
    let reload = std::thread::spawn(move || {
        std::process::Command::new(baton_tests::binaries::supervisor())
            .args(["reload", "--socket"])
            .arg(socket_path)
            .output()
            .unwrap()
    });
    let mut starting = None;
    assert!(wait_until(WAIT, || {
        starting = supervisor
            .generations()
            .into_iter()
            .find(|g| g.2 == "starting")
            .map(|g| g.1);
        starting.is_some()
    }));
    kill(Pid::from_raw(starting.unwrap() as i32), Signal::SIGKILL).unwrap();
    let out = baton_tests::blocking(|| reload.join().unwrap());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("exited before it was ready (killed by signal 9 (SIGKILL))"),
        "{stderr}"
    );

    // 2. Hung past the readiness timeout: killed by the supervisor.
    let out = supervisor.reload();
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .contains("not ready within the readiness timeout (2s)"),
        "{}",
        out.stderr
    );
    assert_eq!(
        supervisor.generations().len(),
        1,
        "only the active one is left"
    );

    // 3. The next normal reload works.
    supervisor.write_config(&with_timeout(&good));
    let out = supervisor.reload();
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(client::get(listen, "/after").await.status, 200);
}

#[test]
fn baton_explains_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.toml");
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nname = \"l\"\naddress = \"{}\"\nprotocol = \"http\"\n[[listener.route]]\ndirect_response = {{ status = 200 }}\n[stats]\npath = \"stats.shm\"\n[supervisor]\ncontrol_socket = \"baton.sock\"\nproxy_binary = \"/nonexistent/baton-proxy\"\n",
            free_addr()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let mut child = std::process::Command::new(baton_tests::binaries::supervisor())
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        assert!(
            wait_until(WAIT, || matches!(child.try_wait(), Ok(Some(_)))),
            "baton {args:?} kept running"
        );
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let config = config.to_str().unwrap();
    let (code, err) = run(&["run", "--config", config]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("baton-proxy not found: looked for /nonexistent/baton-proxy (supervisor.proxy_binary in the config)"),
        "{err}"
    );
    let (code, err) = run(&["status", "--config", config]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("no supervisor is listening on") && err.contains("baton.sock"),
        "{err}"
    );
    std::fs::write(
        dir.path().join("bad.toml"),
        "[supervisor]\nreadyness_timeout = \"1s\"\n",
    )
    .unwrap();
    let bad = dir.path().join("bad.toml");
    // A file that does not load still names its mistake, and the command still looks for a
    // supervisor (here: the default instance's, as the file names no other).
    let (code, err) = run(&["reload", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("bad.toml:2:1: unknown field `readyness_timeout`")
            && err.contains("using the default control socket of instance `baton`")
            && err.contains("no supervisor is listening on"),
        "{err}"
    );
    let (code, err) = run(&["reload"]);
    assert_eq!(code, Some(2), "a command needs --config or --socket: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_host_queues_new_clients_until_a_reload_and_loses_none() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let supervisor = Supervisor::start(&config(listen, admin, origin.addr, ""));
    let keep_alive = Load::start(listen, "/x", Mode::KeepAlive, 2, LOAD_LIMIT);
    let per_request = Load::start(listen, "/x", Mode::PerRequest, 2, LOAD_LIMIT);
    answered(&keep_alive, 20).await;
    answered(&per_request, 20).await;

    let out = supervisor.command("drain", &[]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("drained: generation 0 no longer accepts"),
        "{}",
        out.stdout
    );
    // The drained generation finishes its connections and leaves; nothing replaces it.
    assert!(
        wait_until(WAIT, || supervisor.generations().is_empty()),
        "{:?}",
        supervisor.generations()
    );
    let status = supervisor.status();
    assert_eq!(status["drained"], true, "{status}");
    assert_eq!(status["active_epoch"], serde_json::Value::Null);
    let table = supervisor.command("status", &[]).stdout;
    assert!(table.contains("DRAINED"), "{table}");
    // Clients are not refused: their connections wait in the accept queue.
    let waiting = std::net::TcpStream::connect(listen);
    assert!(
        waiting.is_ok(),
        "a drained host accepts into its queue: {waiting:?}"
    );

    let out = supervisor.reload();
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("generation 1 is active"),
        "{}",
        out.stdout
    );
    assert_eq!(supervisor.status()["drained"], false);
    answered(&keep_alive, 20).await;
    answered(&per_request, 20).await;

    for (name, load) in [("keep-alive", keep_alive), ("per-request", per_request)] {
        let report = load.stop().await;
        assert_eq!(
            report.failures(),
            0,
            "{name}: {report:?}\n{}",
            supervisor.log()
        );
        assert!(
            report.epochs.contains_key("0") && report.epochs.contains_key("1"),
            "{name}: answers before the drain and after the reload: {:?}",
            report.epochs
        );
    }
    assert_eq!(supervisor.status()["crashes"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigwinch_and_drain_listeners_drain_like_baton_drain() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let supervisor = Supervisor::start(&config(listen, admin, origin.addr, ""));

    supervisor.signal(Signal::SIGWINCH);
    assert!(
        wait_until(WAIT, || supervisor.status()["drained"] == true),
        "{}",
        supervisor.log()
    );
    assert!(wait_until(WAIT, || supervisor.generations().is_empty()));
    let out = supervisor.command("drain", &[]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("already drained"), "{}", out.stdout);
    assert_eq!(supervisor.reload().code, Some(0));
    assert_eq!(
        client::get(listen, "/x").await.header("x-baton-epoch"),
        Some("1")
    );

    // The active generation's admin endpoint asks the supervisor for the same drain.
    let mut c = H1::connect(admin).await.unwrap();
    let r = c
        .send(client::request("POST", "admin", "/drain_listeners", ""))
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(
        wait_until(WAIT, || supervisor.status()["drained"] == true),
        "{}",
        supervisor.log()
    );
    assert_eq!(supervisor.reload().code, Some(0));
    assert_eq!(
        client::get(listen, "/x").await.header("x-baton-epoch"),
        Some("2")
    );
    assert_eq!(supervisor.status()["crashes"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_supervisor_stays_drained_through_its_own_upgrade() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let baton = std::fs::read(baton_tests::binaries::supervisor()).unwrap();
    let supervisor = Supervisor::start_with(
        &format!(
            "{}\n[supervisor]\ncontrol_socket = \"baton.sock\"\nproxy_binary = \"{}\"\n",
            config(listen, admin, origin.addr, ""),
            baton_tests::binaries::proxy().display()
        ),
        &[("baton", &baton)],
        &Options {
            binary: Some("baton".into()),
            ..Options::default()
        },
    );
    let out = supervisor.command("drain", &[]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(wait_until(WAIT, || supervisor.generations().is_empty()));
    let pid = supervisor.status()["supervisor_pid"].clone();

    let out = supervisor.command("upgrade-supervisor", &[]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    // The command answers once the upgraded supervisor has taken over.
    let status = supervisor.status();
    assert_eq!(
        status["supervisor_upgrades"],
        1,
        "{status}\n{}",
        supervisor.log()
    );
    assert_eq!(status["supervisor_pid"], pid, "upgraded in place");
    assert_eq!(status["drained"], true, "{status}");
    // Nothing was started on the way: the next reload starts generation 1.
    let out = supervisor.reload();
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("generation 1 is active"),
        "{}",
        out.stdout
    );
    assert_eq!(
        client::get(listen, "/x").await.header("x-baton-epoch"),
        Some("1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_naming_another_config_file_is_refused() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let supervisor = Supervisor::start(&config(listen, admin, origin.addr, ""));
    let own = supervisor.dir().join("baton.toml");
    let other = supervisor.dir().join("other.toml");
    // The same text (and so the same control socket), in another file.
    std::fs::copy(&own, &other).unwrap();
    let reloads = supervisor.status()["reloads"].clone();
    let reload = |config: &std::path::Path| {
        let config = config.to_owned();
        baton_tests::blocking(move || {
            std::process::Command::new(baton_tests::binaries::supervisor())
                .args(["reload", "--config"])
                .arg(config)
                .output()
                .expect("baton can be run")
        })
    };
    let out = reload(&other);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "a usage error: {stderr}");
    assert!(
        stderr.contains("baton.toml, the file it was started with, not")
            && stderr.contains("other.toml"),
        "{stderr}"
    );
    assert_eq!(
        supervisor.status()["reloads"],
        reloads,
        "nothing was reloaded"
    );
    // The file it runs with, however it is written, reloads.
    let out = reload(&supervisor.dir().join(".").join("baton.toml"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
