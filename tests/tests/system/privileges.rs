use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use baton_tests::client;
use baton_tests::config::Edit;
use baton_tests::supervisor::{Options, Supervisor};

/// The unprivileged user the tests run generations as; created when missing.
const USER: &str = "baton-test";

/// The user's uid and gid, creating the user if it does not exist. Fails the test, saying why,
/// when it cannot run here: a test that needs root must never pass without having run.
pub fn test_user() -> (u32, u32) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (it runs processes as another user) and runs as uid {}: run it as root, or leave out --ignored",
        nix::unistd::geteuid()
    );
    if nix::unistd::User::from_name(USER).ok().flatten().is_none() {
        let made = std::process::Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                USER,
            ])
            .status();
        // Another test binary may have made it meanwhile.
        assert!(
            matches!(made, Ok(s) if s.success())
                || nix::unistd::User::from_name(USER).ok().flatten().is_some(),
            "cannot create the test user {USER} with useradd: {made:?}"
        );
    }
    let user = nix::unistd::User::from_name(USER)
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("the test user {USER} exists"));
    (user.uid.as_raw(), user.gid.as_raw())
}

/// A free port below 1024 on 127.0.0.1: only root may bind it.
fn privileged_addr(after: u16) -> SocketAddr {
    (after..1024)
        .map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .find(|addr| TcpListener::bind(addr).is_ok())
        .expect("a free port below 1024")
}

fn config(listeners: &[SocketAddr]) -> String {
    let mut config = format!(
        "instance = \"privileges\"\nepoch_header = true\n\n[supervisor]\ncontrol_socket = \"baton.sock\"\nuser = \"{USER}\"\n"
    );
    for (i, addr) in listeners.iter().enumerate() {
        config.push_str(&format!(
            "\n[[listener]]\nname = \"l{i}\"\naddress = \"{addr}\"\nprotocol = \"http\"\n\n[[listener.route]]\ndirect_response = {{ status = 200, body = \"listener {i}\\n\" }}\n"
        ));
    }
    config
}

/// `Uid:`, `Gid:`, `Groups:` and `NoNewPrivs:` of a process, from /proc.
fn credentials(pid: u32) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .filter(|l| {
            ["Uid:", "Gid:", "Groups:", "NoNewPrivs:"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: runs generations as another user, on ports below 1024"]
async fn generations_run_as_the_configured_user_on_ports_only_root_may_bind() {
    let (uid, gid) = test_user();
    let first = privileged_addr(700);
    let supervisor = Supervisor::start_with(
        &config(&[first]),
        &[],
        &Options {
            shared_dir: true,
            ..Options::default()
        },
    );
    let check = |pid: u32| {
        assert_eq!(
            credentials(pid),
            [
                format!("Uid: {uid} {uid} {uid} {uid}"),
                format!("Gid: {gid} {gid} {gid} {gid}"),
                "Groups:".to_owned(),
                "NoNewPrivs: 1".to_owned(),
            ],
            "real, effective, saved and filesystem ids are all the user's: no way back to root"
        );
    };
    check(supervisor.active_pid().expect("an active generation"));
    let r = client::get(first, "/").await;
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (200, "listener 0\n")
    );

    // A reload that adds a second port below 1024: the supervisor binds it for the generation.
    let second = privileged_addr(first.port() + 1);
    supervisor.write_config(&config(&[first, second]));
    let out = supervisor.reload();
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    check(supervisor.active_pid().expect("an active generation"));
    let r = client::get(second, "/").await;
    assert_eq!(r.text(), "listener 1\n");
    assert_eq!(r.header("x-baton-epoch"), Some("1"));
    let unprivileged_from: u16 =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1024);
    if second.port() < unprivileged_from {
        assert!(
            supervisor
                .log()
                .contains("bound a listen socket for an unprivileged generation"),
            "{}",
            supervisor.log()
        );
    } else {
        println!(
            "this kernel lets any user bind port {}: the supervisor had nothing to bind",
            second.port()
        );
    }
}

#[test]
fn an_unknown_user_is_a_config_error_that_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.toml");
    std::fs::write(
        &path,
        "[supervisor]\nuser = \"no-such-user-here\"\n\n[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:1\"\nprotocol = \"http\"\n\n[[listener.route]]\ndirect_response = { status = 200 }\n",
    )
    .unwrap();
    let out = std::process::Command::new(baton_tests::binaries::supervisor())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no user `no-such-user-here`") && stderr.contains(":2:"),
        "{stderr}"
    );
}

/// The capabilities the shipped systemd unit leaves the supervisor (`CapabilityBoundingSet=`,
/// with `NoNewPrivileges=`), read from `systemd/baton.service`, as `setpriv` arguments.
fn unit_capabilities() -> Vec<String> {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/baton.service"),
    )
    .unwrap();
    let setting = |name: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let caps = setting("CapabilityBoundingSet").expect("the unit bounds the capabilities");
    let mut args = vec![format!(
        "--bounding-set=-all{}",
        caps.split_whitespace()
            .map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect::<String>()
    )];
    if setting("NoNewPrivileges").as_deref() == Some("yes") {
        args.push("--no-new-privs".into());
    }
    args
}

/// Under the shipped unit's capability bounding set, a supervisor started as root (as systemd
/// starts it) with `supervisor.user` works: its generations run as the user on a port only
/// root may bind, a reload binds another such port, a stopped-up generation is killed at the
/// end of its drain, and the stop completes. The bounding set is applied with `setpriv`, as
/// systemd would, without systemd as PID 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: starts the supervisor as root, as the shipped unit does"]
async fn the_shipped_units_capabilities_let_the_supervisor_drop_privileges() {
    test_user();
    let Some(setpriv) = baton_tests::on_path("setpriv") else {
        panic!("setpriv is missing: apt-get install -y util-linux");
    };
    let wrapper = format!(
        "#!/bin/sh\nexec {} {} -- {} \"$@\"\n",
        setpriv.display(),
        unit_capabilities().join(" "),
        baton_tests::binaries::supervisor().display()
    );
    let first = privileged_addr(720);
    let mut supervisor = Supervisor::start_with(
        &config(&[first]).edit("[supervisor]\n", "drain_timeout = \"1s\"\n[supervisor]\n"),
        &[("baton-in-unit", wrapper.as_bytes())],
        &Options {
            shared_dir: true,
            binary: Some("baton-in-unit".into()),
            ..Options::default()
        },
    );
    let effective = std::fs::read_to_string(format!("/proc/{}/status", supervisor.pid()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("CapBnd:"))
        .map(str::to_owned)
        .unwrap();
    assert_ne!(
        effective, "CapBnd:\t000001ffffffffff",
        "the bounding set applies"
    );
    assert_eq!(client::get(first, "/").await.text(), "listener 0\n");

    let second = privileged_addr(first.port() + 1);
    supervisor.write_config(
        &config(&[first, second]).edit("[supervisor]\n", "drain_timeout = \"1s\"\n[supervisor]\n"),
    );
    let out = supervisor.reload();
    assert_eq!(
        out.code,
        Some(0),
        "{}{}\n{}",
        out.stdout,
        out.stderr,
        supervisor.log()
    );
    assert_eq!(client::get(second, "/").await.text(), "listener 1\n");

    // A generation that cannot drain (stopped) is killed when its drain time is up: the
    // supervisor may signal a process of another user.
    let pid = supervisor.active_pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let out = supervisor.command("stop", &[]);
    assert_eq!(
        out.code,
        Some(0),
        "{}{}\n{}",
        out.stdout,
        out.stderr,
        supervisor.log()
    );
    let exit = supervisor
        .wait_exit(crate::WAIT)
        .expect("the supervisor exits");
    assert_eq!(exit.code(), Some(0), "{}", supervisor.log());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the stopped generation was killed"
    );
}
