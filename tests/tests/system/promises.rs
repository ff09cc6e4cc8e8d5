use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use baton_tests::client::{self, H1};
use baton_tests::config::Edit;
use baton_tests::load::{Load, Mode};
use baton_tests::supervisor::Supervisor;
use baton_tests::upstream::Origin;
use baton_tests::{free_addr, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::WAIT;

/// Longest any load in these tests may run; each stops earlier by itself when the test is done.
const LOAD_LIMIT: Duration = Duration::from_secs(120);

/// A listener on `listen` proxying to `origin` (paths under a prefix to another origin, when
/// given), the access log beside the config, and `extra` at the top level.
fn config(
    listen: SocketAddr,
    origin: SocketAddr,
    other: Option<(&str, SocketAddr)>,
    extra: &str,
) -> String {
    let other = other.map_or(String::new(), |(prefix, addr)| {
        format!(
            "[[listener.route]]\npath_prefix = \"{prefix}\"\ncluster = \"other\"\n\n[[cluster]]\nname = \"other\"\nendpoints = [\"{addr}\"]\n\n"
        )
    });
    format!(
        r#"
instance = "promises"
concurrency = 2
epoch_header = true
drain_idle_grace = "500ms"
{extra}

[[listener]]
name = "public"
address = "{listen}"
protocol = "http"
access_log = "access.log"

{other}[[listener.route]]
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

/// `downstream_rq_time{listener=public}` as `baton-stats --format json` reads it from the
/// region: count, sum (µs) and the count in each bucket (by upper bound).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Histogram {
    count: u64,
    sum: u64,
    buckets: BTreeMap<u64, u64>,
}

fn request_time(region: &Path) -> Histogram {
    let (code, out, err) = baton_tests::baton_stats(&[
        "--path",
        region.to_str().unwrap(),
        "--format",
        "json",
        "^downstream_rq_time",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let h = doc["stats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "downstream_rq_time" && s["tags"]["listener"] == "public")
        .unwrap_or_else(|| panic!("no downstream_rq_time in {out}"));
    Histogram {
        count: h["count"].as_u64().unwrap(),
        sum: h["sum"].as_u64().unwrap(),
        buckets: h["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| (b[0].as_u64().unwrap(), b[1].as_u64().unwrap()))
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_time_histograms_never_go_back_across_reloads_and_a_killed_generation() {
    let origin = Origin::start("origin").await;
    let listen = free_addr();
    let supervisor =
        Supervisor::start(&config(listen, origin.addr, None, "drain_timeout = \"2s\""));
    let region = supervisor.dir().join("stats.shm");
    let mut sent = 0;
    let mut before = request_time(&region);
    assert_eq!(before.count, 0, "{before:?}");
    // Reloads, a SIGKILL in the middle, reloads, and a SIGKILL of the last generation.
    for round in 0..8 {
        for i in 0..5 {
            // Some answers take longer, so that several buckets fill.
            let path = if i == 0 { "/slow/30" } else { "/x" };
            assert_eq!(client::get(listen, path).await.status, 200);
            sent += 1;
        }
        assert!(
            wait_until(WAIT, || request_time(&region).count == sent),
            "round {round}: {:?}, {sent} requests answered",
            request_time(&region)
        );
        let now = request_time(&region);
        assert!(now.sum > before.sum, "round {round}: {before:?} -> {now:?}");
        before = now;
        let victim = supervisor.active_pid().unwrap();
        if round == 3 || round == 7 {
            // Nothing is in flight: a crash now must lose no count, nor any time summed.
            kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
            assert!(wait_until(WAIT, || supervisor
                .active_pid()
                .is_some_and(|pid| pid != victim)));
        } else {
            let out = supervisor.reload();
            assert_eq!(out.code, Some(0), "{}", out.stderr);
        }
        assert_eq!(request_time(&region), before, "round {round}: at once");
        // Once the old generation is gone, its counts are in the retired row: the same.
        assert!(
            wait_until(WAIT, || supervisor.generations().len() == 1),
            "{:?}",
            supervisor.generations()
        );
        assert_eq!(
            request_time(&region),
            before,
            "round {round}: after generation {victim} left"
        );
    }
    assert_eq!(supervisor.status()["crashes"], 2);
    assert!(before.buckets.len() >= 2, "{before:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_logs_reaches_the_draining_generation_too() {
    let origin = Origin::start("origin").await;
    let listen = free_addr();
    let supervisor = Supervisor::start(&config(
        listen,
        origin.addr,
        None,
        "drain_timeout = \"30s\"",
    ));
    let log = supervisor.dir().join("access.log");
    let rotated = supervisor.dir().join("access.log.1");

    // A request held at the origin's gate keeps generation 0 draining after the reload.
    let mut held = H1::connect(listen).await.unwrap();
    let first = tokio::spawn(async move { held.get("/gate/2?old").await });
    assert!(wait_until(WAIT, || origin.requests() == 1));
    let out = supervisor.reload();
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let states: Vec<(u64, String)> = supervisor
        .generations()
        .into_iter()
        .map(|(epoch, _, state)| (epoch, state))
        .collect();
    assert_eq!(
        states,
        [(0, "draining".to_owned()), (1, "active".to_owned())]
    );

    // Rotation: the file is moved away, then the generations are asked to reopen it.
    std::fs::rename(&log, &rotated).unwrap();
    let out = supervisor.command("reopen-logs", &[]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("asked 2 generation(s)"),
        "{}",
        out.stdout
    );
    let reopened = || supervisor.log().matches("access logs reopened").count();
    assert!(
        wait_until(WAIT, || reopened() == 2),
        "both generations reopened their log: {}",
        supervisor.log()
    );

    // The second request at the gate (on generation 1) lets the first (on generation 0) go.
    let second = client::get(listen, "/gate/2?new").await;
    let first = first.await.unwrap().unwrap();
    assert_eq!(
        (first.status.as_u16(), first.header("x-baton-epoch")),
        (200, Some("0"))
    );
    assert_eq!(
        (second.status.as_u16(), second.header("x-baton-epoch")),
        (200, Some("1"))
    );
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        wait_until(WAIT, || read(&log).contains("/gate/2?old")
            && read(&log).contains("/gate/2?new")),
        "both answers are in the new file:\n{}\nrotated:\n{}",
        read(&log),
        read(&rotated)
    );
    assert!(!read(&rotated).contains("/gate/2"), "{}", read(&rotated));
}

/// The length of the accept queue of the socket listening on `addr`, from /proc/net/tcp.
fn accept_queue(addr: SocketAddr) -> Option<u64> {
    let SocketAddr::V4(v4) = addr else {
        return None;
    };
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(v4.ip().octets()),
        v4.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // local_address, rem_address, st (0A: LISTEN), tx_queue:rx_queue (for a listening
        // socket, rx_queue is the accept queue).
        (fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A"))
            .then(|| u64::from_str_radix(fields.get(4)?.split(':').nth(1)?, 16).ok())
            .flatten()
    })
}

/// A keep-alive client sending requests back to back until an answer says
/// `Connection: close`; every request must be answered 200. Counts its answers in `answers`.
async fn until_closed(listen: SocketAddr, answers: Arc<AtomicU64>) -> Result<u64, String> {
    let deadline = Instant::now() + LOAD_LIMIT;
    let mut c = H1::connect(listen).await.map_err(|e| e.to_string())?;
    let mut n = 0;
    while Instant::now() < deadline {
        let r = c
            .get("/x")
            .await
            .map_err(|e| format!("request {} cut: {e}", n + 1))?;
        if r.status != 200 {
            return Err(format!("request {} answered {}", n + 1, r.status));
        }
        n += 1;
        answers.fetch_add(1, Ordering::SeqCst);
        if r.header("connection") == Some("close") {
            return Ok(n);
        }
    }
    Err(format!("still open after {LOAD_LIMIT:?}"))
}

/// `baton stop` returns once the supervisor has exited, after its generations drained: a
/// script (or an operator) that stops baton and then starts something on its port finds the
/// port free and no request cut. `--no-wait` (above) returns at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baton_stop_waits_for_the_drain_and_the_exit() {
    let origin = Origin::start("origin").await;
    let gate = Origin::start("gate").await;
    let listen = free_addr();
    let mut supervisor = Supervisor::start(&config(
        listen,
        origin.addr,
        Some(("/gate", gate.addr)),
        "drain_timeout = \"20s\"",
    ));
    let held = tokio::spawn(async move { client::get(listen, "/gate/2").await });
    assert!(wait_until(WAIT, || gate.requests() == 1));

    let socket = supervisor.socket.clone();
    let stop = std::thread::spawn(move || {
        std::process::Command::new(baton_tests::binaries::supervisor())
            .args(["stop", "--socket"])
            .arg(&socket)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("baton can be run")
    });
    assert!(
        wait_until(WAIT, || matches!(
            supervisor.generations().as_slice(),
            [(0, _, state)] if state == "draining"
        )),
        "generation 0 drains: {}",
        supervisor.status()
    );
    assert!(
        !stop.is_finished(),
        "baton stop returned while a request was still in flight"
    );

    // The second request at the gate opens it (the origin is asked directly).
    assert_eq!(
        client::get(gate.addr, "/gate/2").await.text(),
        "gate open\n"
    );
    let r = held.await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "gate open\n"));
    let out = baton_tests::blocking(|| stop.join().unwrap());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("baton: stopping") && stdout.contains("baton: stopped: "),
        "{stdout}"
    );
    let exit = supervisor
        .wait_exit(Duration::from_secs(5))
        .expect("the supervisor has exited when baton stop returns");
    assert_eq!(exit.code(), Some(0), "{}", supervisor.log());
    assert!(
        std::net::TcpListener::bind(listen).is_ok(),
        "the port is free"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baton_stop_under_load_cuts_no_request_and_refuses_new_clients_at_once() {
    let origin = Origin::start("origin").await;
    let gate = Origin::start("gate").await;
    let listen = free_addr();
    // Four connections at most, and past them clients wait in the accept queue: two busy
    // keep-alive clients and two requests held at the gate fill the places.
    let mut supervisor = Supervisor::start(
        &config(
            listen,
            origin.addr,
            Some(("/gate", gate.addr)),
            "drain_timeout = \"20s\"",
        )
        .edit(
            "access_log = \"access.log\"",
            "access_log = \"access.log\"\nmax_connections = 4\nmax_connections_action = \"wait\"",
        ),
    );
    let answers = Arc::new(AtomicU64::new(0));
    let busy: Vec<_> = (0..2)
        .map(|_| tokio::spawn(until_closed(listen, answers.clone())))
        .collect();
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { client::get(listen, "/gate/3").await }))
        .collect();
    assert!(wait_until(WAIT, || gate.requests() == 2
        && answers.load(Ordering::SeqCst) >= 50));
    // Two more clients: at least one waits in the accept queue (the other may have been taken
    // by a worker that was already waiting in accept, and is held by the proxy).
    let waiting: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { client::get(listen, "/waited").await }))
        .collect();
    assert!(
        wait_until(WAIT, || accept_queue(listen).is_some_and(|n| n >= 1)),
        "{:?}",
        accept_queue(listen)
    );

    // `--no-wait`: the requests held at the gate are let through below, while it drains.
    let out = supervisor.command("stop", &["--no-wait"]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    // Nothing will accept again: a new client is refused at once, not queued until the
    // supervisor exits (and then reset).
    assert!(
        wait_until(Duration::from_secs(5), || matches!(
            std::net::TcpStream::connect(listen),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )),
        "new clients are still let into the accept queue while the generation drains"
    );
    // The busy clients are told to close, which lets the waiting ones in: all are answered.
    for client in busy {
        let answered = client.await.unwrap();
        assert!(answered.is_ok(), "{answered:?}");
    }
    for client in waiting {
        let r = client.await.unwrap();
        assert_eq!(
            (r.status.as_u16(), r.header("connection")),
            (200, Some("close"))
        );
    }
    // The held requests finish when the gate opens (the origin is asked directly).
    assert_eq!(
        client::get(gate.addr, "/gate/3").await.text(),
        "gate open\n"
    );
    for r in held {
        let r = r.await.unwrap();
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "gate open\n"));
    }
    let exit = supervisor.wait_exit(WAIT).expect("the supervisor exits");
    assert_eq!(exit.code(), Some(0), "{}", supervisor.log());
}

// Only a debug build's proxy offers other protocol versions (BATON_TEST_PROTOCOL_VERSIONS), so
// the test exists in debug builds only (the tests run as a debug build).
#[cfg(debug_assertions)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_speaking_another_protocol_version_is_refused_and_the_old_one_serves_on() {
    let origin = Origin::start("origin").await;
    let listen = free_addr();
    // The proxy binary is a script on disk, so that the test can install "another release".
    let bin = tempfile::tempdir().unwrap();
    let proxy = bin.path().join("baton-proxy");
    let install = |env: &str| {
        let script = format!(
            "#!/bin/sh\n{env}exec {} \"$@\"\n",
            baton_tests::binaries::proxy().display()
        );
        let staged = bin.path().join(".baton-proxy.new");
        baton_tests::write_executable(&staged, script.as_bytes());
        std::fs::rename(&staged, &proxy).unwrap();
    };
    install("");
    let supervisor = Supervisor::start(&format!(
        "{}\n[supervisor]\ncontrol_socket = \"baton.sock\"\nproxy_binary = \"{}\"\n",
        config(listen, origin.addr, None, "drain_timeout = \"2s\""),
        proxy.display()
    ));
    let load = Load::start(listen, "/x", Mode::KeepAlive, 2, LOAD_LIMIT);
    let per_request = Load::start(listen, "/x", Mode::PerRequest, 2, LOAD_LIMIT);
    answered(&load, 20).await;

    install("BATON_TEST_PROTOCOL_VERSIONS=7-9 ");
    let out = supervisor.reload();
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr
            .contains("no common restart protocol version: the supervisor (baton) speaks version")
            && out.stderr.contains(
                "the generation (baton-proxy) versions 7 to 9; upgrade the older of baton and baton-proxy"
            ),
        "{}",
        out.stderr
    );
    answered(&load, 20).await;
    answered(&per_request, 20).await;
    assert!(
        wait_until(WAIT, || supervisor.generations().len() == 1),
        "the refused generation is gone: {:?}",
        supervisor.generations()
    );
    let (epoch, _, state) = supervisor.generations().remove(0);
    assert_eq!((epoch, state.as_str()), (0, "active"));
    let status = supervisor.status();
    assert_eq!(status["reload_failures"], 1, "{status}");
    assert_eq!(
        client::get(listen, "/after").await.header("x-baton-epoch"),
        Some("0")
    );

    install("");
    let out = supervisor.reload();
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    answered(&load, 20).await;
    for (name, load) in [("keep-alive", load), ("per-request", per_request)] {
        let report = load.stop().await;
        assert_eq!(report.failures(), 0, "{name}: {report:?}");
    }
}

/// The supervisor's open descriptors, each as what it points to (a Unix socket with its type
/// and state from /proc/net/unix, so that a failure says which kind was left open).
fn descriptors(pid: u32) -> Vec<String> {
    let unix = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let describe = |target: String| {
        let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
        else {
            return target;
        };
        // Num RefCount Protocol Flags Type St Inode [Path]
        let found = unix.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(6) == Some(&inode)).then(|| {
                let kind = match fields[4] {
                    "0001" => "stream",
                    "0002" => "datagram",
                    "0005" => "seqpacket",
                    other => other,
                };
                format!(
                    "unix {kind} state {} {}",
                    fields[5],
                    fields.get(7).unwrap_or(&"")
                )
            })
        });
        format!("{target} {}", found.unwrap_or_else(|| "(not unix)".into()))
    };
    let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let target = std::fs::read_link(e.path()).ok()?.display().to_string();
            Some(format!(
                "{} -> {}",
                e.file_name().to_string_lossy(),
                describe(target)
            ))
        })
        .collect();
    fds.sort();
    fds
}

#[test]
fn the_supervisor_holds_no_more_descriptors_after_200_reloads() {
    let listen = free_addr();
    let supervisor = Supervisor::start(&format!(
        "instance = \"fds\"\nconcurrency = 1\ndrain_timeout = \"1s\"\n\n[[listener]]\nname = \"l\"\naddress = \"{listen}\"\nprotocol = \"http\"\n\n[[listener.route]]\ndirect_response = {{ status = 200 }}\n"
    ));
    let control = supervisor.socket.display().to_string();
    // One generation, and no control connection open: the connection of the last `baton`
    // command may close a moment after the command got its answer (on a busy machine the
    // supervisor can be descheduled between its last write and the close). A leaked one never
    // closes, and fails the wait.
    let settled = |after: &str| {
        assert!(
            wait_until(WAIT, || supervisor.generations().len() == 1),
            "{after}: old generations left: {:?}",
            supervisor.generations()
        );
        let mut fds = Vec::new();
        let quiet = wait_until(WAIT, || {
            fds = descriptors(supervisor.pid());
            !fds.iter()
                .any(|fd| fd.ends_with(&control) && fd.contains(" state 03 "))
        });
        assert!(
            quiet,
            "{after}: a control connection stays open:\n{}",
            fds.join("\n")
        );
        fds
    };
    for _ in 0..5 {
        assert_eq!(supervisor.reload().code, Some(0));
    }
    let warm = settled("warm-up");
    let started = Instant::now();
    for i in 0..200 {
        let out = supervisor.reload();
        assert_eq!(out.code, Some(0), "reload {i}: {}", out.stderr);
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "200 reloads take over 5 minutes: {i} done"
        );
    }
    let after = settled("200 reloads");
    assert_eq!(
        after.len(),
        warm.len(),
        "descriptors after the warm-up:\n{}\nafter 200 reloads:\n{}",
        warm.join("\n"),
        after.join("\n")
    );
    println!("200 reloads in {:?}", started.elapsed());
}
