//! Never a moment without a proxy: whatever crashes or is broken on disk, and whatever the
//! operator asks meanwhile, the supervisor gets a generation active again, from the last config
//! that was active; a reload checks the whole file; a hurried drain cuts no answer.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use baton_tests::client;
use baton_tests::config::Edit;
use baton_tests::supervisor::Supervisor;
use baton_tests::upstream::{Origin, TcpEcho};
use baton_tests::{free_addr, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::WAIT;

fn config(listen: SocketAddr, origin: SocketAddr, supervisor: &str) -> String {
    format!(
        r#"
instance = "recovery"
concurrency = 1
drain_timeout = "30s"
drain_idle_grace = "500ms"

[[listener]]
name = "public"
address = "{listen}"
protocol = "http"

[[listener.route]]
cluster = "origin"

[[cluster]]
name = "origin"
endpoints = ["{origin}"]

[supervisor]
control_socket = "baton.sock"
{supervisor}
"#
    )
}

/// A config the supervisor's own checks pass but the proxy refuses (exit 64 before it is
/// ready).
fn broken(config: &str) -> String {
    config.edit("protocol = \"http\"", "protocol = \"http\"\nbogus = 1")
}

/// Asks until the listener answers 200; how long that took.
async fn until_served(listen: SocketAddr) -> Duration {
    let start = Instant::now();
    while start.elapsed() < WAIT {
        if let Ok(Ok(reply)) =
            tokio::time::timeout(Duration::from_secs(5), client::try_get(listen, "/up")).await
            && reply.status == 200
        {
            return start.elapsed();
        }
    }
    panic!("nothing answered on {listen} within {WAIT:?}");
}

fn kill_active(supervisor: &Supervisor) -> u32 {
    let victim = supervisor.active_pid().expect("an active generation");
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    victim
}

/// Item 1: a crash, then a reload (to a config that fails) while the replacement waits out
/// its delay: the reload fails and says so, and the replacement still comes, from the last
/// config that was active, though the file on disk is still broken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_fails_after_a_crash_never_leaves_the_host_without_a_proxy() {
    let origin = Origin::start("origin").await;
    let listen = free_addr();
    let good = config(listen, origin.addr, "");
    let supervisor = Supervisor::start(&good);
    supervisor.write_config(&broken(&good));
    for round in 0..3 {
        let victim = kill_active(&supervisor);
        let out = supervisor.reload();
        assert_eq!(out.code, Some(1), "round {round}: {out:?}");
        assert!(
            out.stderr.contains("unknown field `bogus`"),
            "round {round}: the reload says why it failed: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains("no generation is active"),
            "round {round}: and that no generation serves yet: {}",
            out.stderr
        );
        assert!(
            wait_until(WAIT, || supervisor
                .active_pid()
                .is_some_and(|pid| pid != victim)),
            "round {round}: a replacement from the last good config became active:\n{}",
            supervisor.log()
        );
        until_served(listen).await;
    }
    assert_eq!(supervisor.status()["crashes"], 3);
}

/// Item 1: a crash while the config and the binary on disk are both broken: the replacement
/// runs the binary and config the crashed generation ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_generation_is_replaced_from_its_own_binary_and_config_not_the_disk() {
    let origin = Origin::start("origin").await;
    let listen = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let installed = dir.path().join("baton-proxy");
    baton_tests::write_executable(
        &installed,
        &std::fs::read(baton_tests::binaries::proxy()).unwrap(),
    );
    let good = config(
        listen,
        origin.addr,
        &format!("proxy_binary = \"{}\"", installed.display()),
    );
    let supervisor = Supervisor::start(&good);
    // A broken binary installed the way a package manager installs (rename over), and a
    // broken config.
    let staged = dir.path().join(".baton-proxy.new");
    baton_tests::write_executable(&staged, b"#!/bin/sh\necho broken build >&2\nexit 1\n");
    std::fs::rename(&staged, &installed).unwrap();
    supervisor.write_config(&broken(&good));
    let out = supervisor.reload();
    assert_eq!(out.code, Some(1), "{out:?}");

    let victim = kill_active(&supervisor);
    assert!(
        wait_until(WAIT, || supervisor
            .active_pid()
            .is_some_and(|pid| pid != victim)),
        "replaced:\n{}",
        supervisor.log()
    );
    until_served(listen).await;
    let log = supervisor.log();
    assert_eq!(
        log.matches("broken build").count(),
        1,
        "the binary on disk ran for the reload only, not for the replacement:\n{log}"
    );
}

/// Item 2: a generation that served, then crashed, eight times over: every time the listener
/// answers again within a second or two, never after a growing delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_that_served_then_crashed_are_replaced_at_once_every_time() {
    let origin = Origin::start("origin").await;
    let listen = free_addr();
    let supervisor = Supervisor::start(&config(listen, origin.addr, ""));
    let mut outages = Vec::new();
    for _ in 0..8 {
        until_served(listen).await;
        // The generation serves for a while before it crashes: that is the scenario, not a
        // wait for something to happen.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        kill_active(&supervisor);
        outages.push(until_served(listen).await);
    }
    let worst = outages.iter().max().unwrap();
    // 100 ms of delay and a generation's start; the delay used to double up to 10 s.
    assert!(
        *worst < Duration::from_millis(2500),
        "outages after each crash: {outages:?}"
    );
}

/// Item 4: with `max_draining = 1`, two reloads in a row hurry the oldest generation while it
/// sends a 10 MiB answer to a slow client and carries a TCP session: both go on to their end,
/// well past the two seconds a hurry used to give them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hurried_generation_finishes_its_answers_and_sessions() {
    let origin = Origin::start("origin").await;
    let echo = TcpEcho::start().await;
    let (listen, tcp) = (free_addr(), free_addr());
    let extra = format!(
        "[[listener]]\nname = \"l4\"\naddress = \"{tcp}\"\nprotocol = \"tcp\"\ncluster = \"echo\"\n\n[[cluster]]\nname = \"echo\"\nendpoints = [\"{}\"]\n",
        echo.addr
    );
    let text = config(listen, origin.addr, "max_draining = 1")
        .edit("[supervisor]", &format!("{extra}\n[supervisor]"));
    let supervisor = Supervisor::start(&text);

    const SIZE: usize = 10 * 1024 * 1024;
    let mut download = TcpStream::connect(listen).await.unwrap();
    download
        .write_all(format!("GET /bytes/{SIZE} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut received = vec![0u8; 256 * 1024];
    let mut total = 0;
    let n = download.read(&mut received).await.unwrap();
    assert!(n > 0);
    total += n;
    let mut session = TcpStream::connect(tcp).await.unwrap();
    let echo_round = async |session: &mut TcpStream, word: &[u8]| {
        session.write_all(word).await.unwrap();
        let mut back = vec![0u8; word.len()];
        tokio::time::timeout(WAIT, session.read_exact(&mut back))
            .await
            .expect("the session answers")
            .expect("the session is open");
        assert_eq!(back, word);
    };
    echo_round(&mut session, b"before").await;

    for _ in 0..2 {
        assert_eq!(supervisor.reload().code, Some(0));
    }
    // The second reload hurried generation 0 (it drains immediately now).
    assert!(
        wait_until(WAIT, || supervisor.log().lines().any(|l| l
            .contains("draining epoch=0")
            && l.contains("strategy=\"immediate\""))),
        "{}",
        supervisor.log()
    );
    // The client is slow: it reads nothing for three seconds (a hurry used to close what was
    // left after two).
    tokio::time::sleep(Duration::from_secs(3)).await;
    echo_round(&mut session, b"after the hurry").await;
    loop {
        let n = tokio::time::timeout(WAIT, download.read(&mut received))
            .await
            .expect("the download goes on")
            .unwrap();
        if n == 0 {
            break;
        }
        total += n;
        let headers = 128;
        if total >= SIZE + headers {
            // The answer is whole when its body is: the head is a few dozen bytes.
            break;
        }
    }
    assert!(
        total >= SIZE,
        "the whole answer arrived: {total} of {SIZE} bytes (and a head)"
    );
    assert!(
        supervisor
            .generations()
            .iter()
            .any(|(epoch, _, state)| *epoch == 0 && state == "draining"),
        "the hurried generation is still draining its answer"
    );
}

/// Item 6: a reload, by SIGHUP or by `baton reload`, checks the supervisor's part of the config
/// as `baton check` and `baton run` do, and refuses what a reload cannot apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_checks_the_whole_file_and_refuses_what_it_cannot_apply() {
    let origin = Origin::start("origin").await;
    let listen = free_addr();
    let good = config(listen, origin.addr, "");
    let supervisor = Supervisor::start(&good);
    let active = supervisor.active_pid().unwrap();
    let cases: &[(&str, &str)] = &[
        (
            "readyness_timeout = \"1s\"",
            "unknown field `readyness_timeout`",
        ),
        (
            "max_draining = -1",
            "supervisor.max_draining: expected a number from 1 to 64",
        ),
        (
            "readiness_timeout = \"banana\"",
            "`banana` is not a duration",
        ),
        ("user = \"nosuchuser\"", "no user `nosuchuser`"),
        (
            "proxy_binary = \"/nonexistent/baton-proxy\"",
            "baton-proxy not found: looked for /nonexistent/baton-proxy",
        ),
    ];
    let mut failures = 0;
    for (line, message) in cases {
        supervisor.write_config(&config(listen, origin.addr, line));
        let out = supervisor.reload();
        assert_eq!(out.code, Some(1), "{line}: {out:?}");
        assert!(out.stderr.contains(message), "{line}: {}", out.stderr);
        assert!(
            out.stderr.contains("baton.toml:"),
            "{line}: names the file: {}",
            out.stderr
        );
        failures += 1;
        // By signal too: the reload fails the same way and nothing is started.
        supervisor.signal(Signal::SIGHUP);
        failures += 1;
        assert!(
            wait_until(WAIT, || supervisor.status()["reload_failures"] == failures),
            "{line}: {}",
            supervisor.log()
        );
        assert_eq!(supervisor.active_pid(), Some(active), "{line}");
    }
    let unappliable: &[(&str, &str, &str)] = &[
        (
            "instance = \"recovery\"",
            "instance = \"other\"",
            "instance changed",
        ),
        (
            "[supervisor]",
            "[stats]\npath = \"elsewhere.shm\"\n[supervisor]",
            "stats.path changed",
        ),
    ];
    for (from, to, message) in unappliable {
        supervisor.write_config(&good.edit(from, to));
        let out = supervisor.reload();
        assert_eq!(out.code, Some(1), "{to}: {out:?}");
        assert!(out.stderr.contains(message), "{to}: {}", out.stderr);
        assert!(out.stderr.contains("restart baton"), "{to}: {}", out.stderr);
        assert_eq!(supervisor.active_pid(), Some(active));
    }
    // Settings a reload can apply do apply, and the good file reloads.
    supervisor.write_config(&config(listen, origin.addr, "max_draining = 3"));
    assert_eq!(supervisor.reload().code, Some(0));
    assert_eq!(client::get(listen, "/after").await.status, 200);
}

/// Item 7: a drain timeout of zero and a listen port of zero are refused, with the reason.
#[test]
fn a_zero_drain_timeout_and_port_zero_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.toml");
    let base = format!(
        "[[listener]]\nname = \"l\"\naddress = \"{}\"\nprotocol = \"http\"\n[[listener.route]]\ndirect_response = {{ status = 200 }}\n[stats]\npath = \"stats.shm\"\n",
        free_addr()
    );
    let cases = [
        (
            format!("drain_timeout = \"0s\"\n{base}"),
            "drain_timeout: must be more than zero",
        ),
        (
            format!("drain_timeout = 0\n{base}"),
            "drain_timeout: must be more than zero",
        ),
        (
            base.edit(
                &base[base.find("127.0.0.1:").unwrap()..base.find("\"\nprotocol").unwrap()],
                "127.0.0.1:0",
            ),
            "port 0 would make the system pick a port",
        ),
        (
            format!("{base}[admin]\naddress = \"127.0.0.1:0\"\n"),
            "admin.address: port 0",
        ),
    ];
    for (text, message) in cases {
        std::fs::write(&path, &text).unwrap();
        let out = std::process::Command::new(baton_tests::binaries::supervisor())
            .arg("check")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}: {stderr}");
        assert!(stderr.contains(message), "{text}: {stderr}");
        assert!(stderr.contains("baton.toml:"), "{text}: {stderr}");
    }
}

/// The `[supervisor]` line naming the built proxy (a supervisor run from a copy of `baton`
/// does not find it beside itself).
fn built_proxy() -> String {
    format!(
        "proxy_binary = \"{}\"",
        baton_tests::binaries::proxy().display()
    )
}

/// A supervisor run from a copy of `baton` beside its config, which tests replace.
fn upgradable(config: &str, env: Vec<(String, String)>) -> (Supervisor, Vec<u8>) {
    let baton = std::fs::read(baton_tests::binaries::supervisor()).unwrap();
    let supervisor = Supervisor::start_with(
        config,
        &[("baton", &baton)],
        &baton_tests::supervisor::Options {
            binary: Some("baton".into()),
            env,
            ..Default::default()
        },
    );
    (supervisor, baton)
}

/// Installs `content` as the supervisor's binary the way a package manager does.
fn install(supervisor: &Supervisor, content: &[u8]) {
    let staged = supervisor.dir().join(".baton.new");
    baton_tests::write_executable(&staged, content);
    std::fs::rename(&staged, supervisor.dir().join("baton")).unwrap();
}

/// Item 3: the upgraded supervisor takes over from the state it is handed, not from the config
/// file, which may be broken by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_takes_over_from_the_running_state_even_with_a_broken_config_on_disk() {
    let origin = Origin::start("origin").await;
    let listen = free_addr();
    // A config larger than a pipe holds (64 KiB), as large installations have.
    let padding: String = (0..2000)
        .map(|i| format!("# a comment line to make the config large, number {i}\n"))
        .collect();
    assert!(padding.len() > 70_000);
    let good = format!("{padding}{}", config(listen, origin.addr, &built_proxy()));
    let (supervisor, baton) = upgradable(&good, Vec::new());
    let before = supervisor.status();
    let build = before["supervisor_build"].as_str().unwrap().to_owned();
    std::fs::write(
        &supervisor.config_path,
        "instance = \"recovery\"\n[[listener]\n",
    )
    .unwrap();
    install(&supervisor, &baton_tests::rebuilt(&baton, &build));
    let out = supervisor.command("upgrade-supervisor", &[]);
    assert_eq!(out.code, Some(0), "{out:?}\n{}", supervisor.log());
    assert!(out.stdout.contains("now runs build"), "{}", out.stdout);
    let after = supervisor.status();
    assert_eq!(after["supervisor_pid"], supervisor.pid());
    assert_ne!(after["supervisor_build"], build);
    assert_eq!(after["supervisor_upgrades"], 1);
    assert_eq!(after["active_epoch"], before["active_epoch"]);
    assert_eq!(client::get(listen, "/after").await.status, 200);
    // The running config is still the one reloads compare with, and a crash is still replaced
    // from it.
    let victim = kill_active(&supervisor);
    assert!(wait_until(WAIT, || supervisor
        .active_pid()
        .is_some_and(|pid| pid != victim)));
    until_served(listen).await;
}

/// Item 3: a binary that answers the self-check but cannot run, a missing binary, garbage, or
/// a binary that hangs: not executed; `baton upgrade-supervisor` says so and exits 1; the
/// supervisor runs on as it was, and answers all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_that_cannot_take_over_is_never_executed() {
    let origin = Origin::start("origin").await;
    let listen = free_addr();
    let (supervisor, _) = upgradable(&config(listen, origin.addr, &built_proxy()), Vec::new());
    let build = supervisor.status()["supervisor_build"]
        .as_str()
        .unwrap()
        .to_owned();
    let pretender: &[u8] = b"#!/bin/sh\nif [ \"$1\" = internal ]; then echo 1 trial; exit 0; fi\necho cannot run >&2\nexit 1\n";
    let cases: &[(&str, Option<&[u8]>, &str)] = &[
        (
            "passes the self-check, cannot run",
            Some(pretender),
            "cannot take over this supervisor",
        ),
        (
            "an old self-check",
            Some(b"#!/bin/sh\necho 1\n"),
            "does no trial take-over",
        ),
        (
            "garbage",
            Some(b"\x7fELF garbage garbage garbage"),
            "cannot run",
        ),
        ("missing", None, "cannot run"),
    ];
    for (what, content, message) in cases {
        match content {
            Some(content) => install(&supervisor, content),
            None => std::fs::remove_file(supervisor.dir().join("baton")).unwrap(),
        }
        let out = supervisor.command("upgrade-supervisor", &[]);
        assert_eq!(out.code, Some(1), "{what}: {out:?}");
        assert!(out.stderr.contains(message), "{what}: {}", out.stderr);
        assert!(out.stderr.contains("as before"), "{what}: {}", out.stderr);
        let status = supervisor.status();
        assert_eq!(status["supervisor_build"], build.as_str(), "{what}");
        assert_eq!(status["supervisor_pid"], supervisor.pid(), "{what}");
        assert_eq!(client::get(listen, "/x").await.status, 200, "{what}");
    }
    // One that hangs in its self-check is given up after a while; the supervisor answers
    // meanwhile.
    install(&supervisor, b"#!/bin/sh\nexec sleep 60\n");
    let socket = supervisor.socket.clone();
    let upgrade = std::thread::spawn(move || {
        std::process::Command::new(baton_tests::binaries::supervisor())
            .args(["upgrade-supervisor", "--socket"])
            .arg(socket)
            .output()
            .unwrap()
    });
    assert!(
        supervisor.wait_for_log("checking the binary on disk", WAIT),
        "{}",
        supervisor.log()
    );
    let asked = Instant::now();
    assert_eq!(supervisor.status()["supervisor_build"], build.as_str());
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "status answered while the check hangs"
    );
    let out = baton_tests::blocking(|| upgrade.join().unwrap());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did not answer its self-check"), "{stderr}");
}

/// Item 3: an upgraded program that fails to take over executes the previous one again, which
/// takes over with everything as it was; the command says it failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_supervisor_that_fails_to_take_over_gives_the_old_one_back() {
    let origin = Origin::start("origin").await;
    let listen = free_addr();
    let (supervisor, baton) = upgradable(
        &config(listen, origin.addr, &built_proxy()),
        vec![("BATON_TEST_TAKEOVER_FAILS".into(), "1".into())],
    );
    let before = supervisor.status();
    let generations = supervisor.generations();
    let build = before["supervisor_build"].as_str().unwrap().to_owned();
    install(&supervisor, &baton_tests::rebuilt(&baton, &build));
    let out = supervisor.command("upgrade-supervisor", &[]);
    assert_eq!(out.code, Some(1), "{out:?}\n{}", supervisor.log());
    assert!(
        out.stderr.contains("BATON_TEST_TAKEOVER_FAILS"),
        "{}",
        out.stderr
    );
    let after = supervisor.status();
    assert_eq!(
        after["supervisor_build"],
        build.as_str(),
        "the old build again"
    );
    assert_eq!(after["supervisor_pid"], supervisor.pid());
    assert_eq!(after["supervisor_upgrades"], 0, "not upgraded: {after}");
    assert!(
        after["last_upgrade"]
            .as_str()
            .is_some_and(|u| u.starts_with("failed: ")),
        "status tells the upgrade failed: {after}"
    );
    assert_eq!(supervisor.generations(), generations);
    assert_eq!(client::get(listen, "/x").await.status, 200);
    // And the log says so, for whoever reads it rather than asks.
    assert!(supervisor.log().contains("this binary took over again"));
    // And it still reloads.
    assert_eq!(supervisor.reload().code, Some(0));
    assert_eq!(client::get(listen, "/y").await.status, 200);
}

/// Kills a process on drop: a generation left without its supervisor must not outlive a test
/// that fails before another supervisor adopts it.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0 as i32), Signal::SIGKILL);
    }
}

/// Item 5: SIGKILL of the supervisor under load: the active generation serves on with its
/// sockets (no connection refused, no request failed), and the next `baton run` adopts it
/// instead of starting cold; it then reloads as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_supervisor_leaves_its_generation_serving_and_the_next_one_adopts_it() {
    use baton_tests::load::{Load, Mode};
    let origin = Origin::start("origin").await;
    let listen = free_addr();
    let mut supervisor = Supervisor::start(
        &config(listen, origin.addr, "").edit("drain_timeout = \"30s\"", "drain_timeout = \"3s\""),
    );
    let generation = supervisor.active_pid().unwrap();
    let _cleanup = KillOnDrop(generation);
    let keep_alive = Load::start(listen, "/x", Mode::KeepAlive, 4, Duration::from_secs(120));
    let per_request = Load::start(listen, "/y", Mode::PerRequest, 2, Duration::from_secs(120));
    let served = |load: &Load, more: u64| {
        let start = load.snapshot().ok;
        wait_until(WAIT, || load.snapshot().ok >= start + more)
    };
    assert!(served(&keep_alive, 50) && served(&per_request, 20));

    supervisor.signal(Signal::SIGKILL);
    assert!(supervisor.wait_exit(WAIT).is_some());
    // Nobody manages the generation now; it serves on.
    assert!(
        served(&keep_alive, 200) && served(&per_request, 50),
        "served without a supervisor: {:?} {:?}",
        keep_alive.snapshot(),
        per_request.snapshot()
    );
    assert!(
        supervisor
            .log()
            .contains("the supervisor is gone; serving on"),
        "{}",
        supervisor.log()
    );

    supervisor.respawn();
    assert!(
        !supervisor.log().contains("did not adopt"),
        "one generation to adopt, adopted at once:\n{}",
        supervisor.log()
    );
    let status = supervisor.status();
    assert_eq!(
        status["active_epoch"], 0,
        "adopted, not started cold: {status}"
    );
    assert_eq!(supervisor.active_pid(), Some(generation));
    assert!(served(&keep_alive, 100) && served(&per_request, 20));
    let (a, b) = (keep_alive.stop().await, per_request.stop().await);
    assert_eq!(a.failures() + b.failures(), 0, "{a:?} {b:?}");

    // The adopted generation is this supervisor's now. It handed over the config it runs: a
    // crash of it is replaced from that, though the file on disk is broken by now.
    let good = std::fs::read_to_string(&supervisor.config_path).unwrap();
    std::fs::write(&supervisor.config_path, broken(&good)).unwrap();
    let log_before = supervisor.log().len();
    kill(Pid::from_raw(generation as i32), Signal::SIGKILL).unwrap();
    assert!(
        wait_until(WAIT, || supervisor
            .active_pid()
            .is_some_and(|pid| pid != generation)),
        "{}",
        supervisor.log()
    );
    until_served(listen).await;
    let log = supervisor.log();
    assert!(
        log[log_before..].contains("from=\"last active config\""),
        "replaced from the adopted generation's config:\n{log}"
    );
    // And reloads work as ever.
    std::fs::write(&supervisor.config_path, &good).unwrap();
    assert_eq!(supervisor.reload().code, Some(0), "{}", supervisor.log());
    until_served(listen).await;
}

/// Item 5: the stats region's file cut short while baton runs: the supervisor and its
/// generation live on (no SIGBUS), keep serving and reloading, and say what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_stats_region_kills_nobody() {
    let origin = Origin::start("origin").await;
    let listen = free_addr();
    let supervisor = Supervisor::start(&config(listen, origin.addr, ""));
    let generation = supervisor.active_pid().unwrap();
    assert_eq!(client::get(listen, "/a").await.status, 200);
    std::fs::OpenOptions::new()
        .write(true)
        .open(supervisor.dir().join("stats.shm"))
        .unwrap()
        .set_len(0)
        .unwrap();
    for _ in 0..20 {
        assert_eq!(client::get(listen, "/b").await.status, 200);
    }
    assert!(
        supervisor.wait_for_log("the stats region was cut short", WAIT)
            && supervisor.wait_for_log("made a new stats region", WAIT),
        "{}",
        supervisor.log()
    );
    assert_eq!(
        supervisor.active_pid(),
        Some(generation),
        "the generation lives"
    );
    // Reloads work, and the next generation's stats are read again.
    assert_eq!(supervisor.reload().code, Some(0), "{}", supervisor.log());
    for _ in 0..3 {
        assert_eq!(client::get(listen, "/c").await.status, 200);
    }
    let region = supervisor.dir().join("stats.shm");
    assert!(
        wait_until(WAIT, || {
            let (code, out, _) = baton_tests::baton_stats(&[
                "--path",
                region.to_str().unwrap(),
                "^downstream_rq_total",
            ]);
            code == Some(0) && out.contains(" 3")
        }),
        "{}",
        supervisor.log()
    );
}

/// The kill-timing fuzz: the active generation (and sometimes the starting one) is killed at
/// random moments around reloads, a quarter of which fail (their config is broken); a probe
/// asks all along, one request per connection. A request waits in the accept queue while no
/// generation accepts, so the slowest answer is the longest time without a proxy. Every round
/// ends with a generation active. Rounds: `BATON_KILL_FUZZ_ROUNDS` (20 by default; the issue's
/// closing note ran 200), seed: `BATON_KILL_FUZZ_SEED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_timing_fuzz_never_leaves_the_host_without_a_proxy() {
    let rounds: u32 = std::env::var("BATON_KILL_FUZZ_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("BATON_KILL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("kill-timing fuzz: {rounds} rounds, seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let origin = Origin::start("origin").await;
    let listen = free_addr();
    let good = config(listen, origin.addr, "readiness_timeout = \"5s\"")
        .edit("drain_timeout = \"30s\"", "drain_timeout = \"1s\"");
    let supervisor = Supervisor::start(&good);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut slowest, mut answered, mut failed) = (Duration::ZERO, 0u64, 0u64);
            let mut refused = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let start = Instant::now();
                let connected = tokio::time::timeout(WAIT, TcpStream::connect(listen)).await;
                match connected {
                    Ok(Ok(stream)) => {
                        let mut h1 = baton_tests::client::H1::handshake(stream).await;
                        match tokio::time::timeout(WAIT, h1.get("/probe")).await {
                            Ok(Ok(reply)) if reply.status == 200 => {
                                answered += 1;
                                slowest = slowest.max(start.elapsed());
                            }
                            // A request on a killed generation is lost with it.
                            Ok(_) => failed += 1,
                            Err(_) => slowest = slowest.max(WAIT),
                        }
                    }
                    // The listen socket never closes: a refused connection is a failure.
                    Ok(Err(e)) => refused.push(e.to_string()),
                    Err(_) => slowest = slowest.max(WAIT),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (slowest, answered, failed, refused)
        }
    });
    for round in 0..rounds {
        let broken = rng.u8(..4) == 0;
        if broken {
            supervisor.write_config(&broken_config(&good));
        }
        let socket = supervisor.socket.clone();
        let round_start = Instant::now();
        let reload = std::thread::spawn(move || {
            std::process::Command::new(baton_tests::binaries::supervisor())
                .args(["reload", "--socket"])
                .arg(socket)
                .output()
                .unwrap()
        });
        // The random moment is the point of the fuzz.
        tokio::time::sleep(Duration::from_millis(rng.u64(..300))).await;
        let generations = supervisor.generations();
        for (_, pid, state) in &generations {
            let victim = state == "active" || (state == "starting" && rng.bool());
            if victim {
                let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            }
        }
        let _ = baton_tests::blocking(|| reload.join().unwrap());
        let reload_took = round_start.elapsed();
        if broken {
            supervisor.write_config(&good);
        }
        assert!(
            wait_until(WAIT, || supervisor.active_pid().is_some()),
            "round {round} (seed {seed}): no active generation:\n{}",
            supervisor.log()
        );
        let outage = until_served(listen).await;
        println!(
            "round {round}: broken config {broken}, killed {}, reload answered after {reload_took:?}, served again {outage:?} after that",
            generations.len()
        );
        tokio::time::sleep(Duration::from_millis(rng.u64(..1500))).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (slowest, answered, failed, refused) = probe.await.unwrap();
    assert!(refused.is_empty(), "seed {seed}: refused: {refused:?}");
    let status = supervisor.status();
    println!(
        "kill-timing fuzz: {rounds} rounds, {} crashes, {answered} probe answers, {failed} lost on killed generations; longest time without an accepting generation: {} ms",
        status["crashes"],
        slowest.as_millis()
    );
    // The delay after a crash is at most a second (for generations that crash within a second
    // of becoming active), plus a generation's start.
    assert!(
        slowest < Duration::from_secs(3),
        "seed {seed}: a probe waited {slowest:?}"
    );
}

fn broken_config(good: &str) -> String {
    broken(good)
}

/// Item 5 with item 3: neither the new binary nor the previous one can take over (a test build
/// made to fail both): the supervisor exits instead of looping or hanging, its generation serves
/// on, and the next `baton run` adopts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_no_binary_can_take_over_the_generation_serves_on_until_the_next_baton_run() {
    use baton_tests::load::{Load, Mode};
    let origin = Origin::start("origin").await;
    let listen = free_addr();
    let (mut supervisor, baton) = upgradable(
        &config(listen, origin.addr, &built_proxy()),
        vec![("BATON_TEST_TAKEOVER_FAILS".into(), "always".into())],
    );
    let generation = supervisor.active_pid().unwrap();
    let _cleanup = KillOnDrop(generation);
    let build = supervisor.status()["supervisor_build"]
        .as_str()
        .unwrap()
        .to_owned();
    let load = Load::start(listen, "/x", Mode::PerRequest, 2, Duration::from_secs(120));
    assert!(wait_until(WAIT, || load.snapshot().ok > 20));
    install(&supervisor, &baton_tests::rebuilt(&baton, &build));
    let out = supervisor.command("upgrade-supervisor", &[]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        supervisor.wait_exit(WAIT).is_some(),
        "the supervisor exits:\n{}",
        supervisor.log()
    );
    assert!(
        supervisor
            .log()
            .contains("the previous binary cannot take over again either"),
        "{}",
        supervisor.log()
    );
    let start = load.snapshot().ok;
    assert!(
        wait_until(WAIT, || load.snapshot().ok > start + 50),
        "served without a supervisor"
    );
    supervisor.respawn();
    assert_eq!(supervisor.active_pid(), Some(generation), "adopted");
    let report = load.stop().await;
    assert_eq!(report.failures(), 0, "{report:?}");
}

/// A listener a reload removes stops listening at once, though the old generation (which held
/// copies of its sockets, to be adopted) still drains a TCP session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_a_reload_removes_closes_while_the_old_generation_drains() {
    let origin = Origin::start("origin").await;
    let echo = TcpEcho::start().await;
    let (listen, tcp, extra) = (free_addr(), free_addr(), free_addr());
    let l4 = format!(
        "[[listener]]\nname = \"l4\"\naddress = \"{tcp}\"\nprotocol = \"tcp\"\ncluster = \"echo\"\n\n[[cluster]]\nname = \"echo\"\nendpoints = [\"{}\"]\n",
        echo.addr
    );
    let with_extra = format!(
        "{l4}\n[[listener]]\nname = \"extra\"\naddress = \"{extra}\"\nprotocol = \"http\"\n[[listener.route]]\ndirect_response = {{ status = 200 }}\n"
    );
    let text = |more: &str| {
        config(listen, origin.addr, "").edit("[supervisor]", &format!("{more}\n[supervisor]"))
    };
    let supervisor = Supervisor::start(&text(&with_extra));
    assert_eq!(client::get(extra, "/").await.status, 200);
    let mut session = TcpStream::connect(tcp).await.unwrap();
    session.write_all(b"hold").await.unwrap();
    let mut back = [0u8; 4];
    session.read_exact(&mut back).await.unwrap();

    supervisor.write_config(&text(&l4));
    assert_eq!(supervisor.reload().code, Some(0));
    assert!(
        supervisor
            .generations()
            .iter()
            .any(|(epoch, _, state)| *epoch == 0 && state == "draining"),
        "generation 0 drains its session"
    );
    assert!(
        baton_tests::wait_until_async(WAIT, || async { TcpStream::connect(extra).await.is_err() })
            .await,
        "the removed listener's port refuses connections"
    );
    session.write_all(b"more").await.unwrap();
    session.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"more");
}
