use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_tests::config::Edit;
use baton_tests::load::{Load, Mode};
use baton_tests::supervisor::{Options, Supervisor};
use baton_tests::upstream::Origin;
use baton_tests::{free_addr, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::WAIT;

/// A datagram socket that plays systemd's notify socket and keeps every message it gets.
struct NotifySocket {
    messages: Arc<Mutex<Vec<String>>>,
    address: String,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind(abstract_name: Option<&str>) -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let (socket, address) = match abstract_name {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name).unwrap();
                (UnixDatagram::bind_addr(&addr).unwrap(), format!("@{name}"))
            }
            None => {
                let path = dir.path().join("notify.sock");
                (
                    UnixDatagram::bind(&path).unwrap(),
                    path.display().to_string(),
                )
            }
        };
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            // Ends when the test drops the last handle on the messages.
            while Arc::strong_count(&sink) > 1 {
                if let Ok(n) = socket.recv(&mut buf) {
                    sink.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
        });
        NotifySocket {
            messages,
            address,
            _dir: dir,
        }
    }

    fn all(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }

    /// The lifecycle messages, by their first line: `READY=1`, `RELOADING=1`, `STOPPING=1`.
    fn lifecycle(&self) -> Vec<String> {
        self.all()
            .iter()
            .filter_map(|m| m.lines().next())
            .filter(|l| ["READY=1", "RELOADING=1", "STOPPING=1"].contains(l))
            .map(str::to_owned)
            .collect()
    }

    fn count(&self, line: &str) -> usize {
        self.all()
            .iter()
            .filter(|m| m.lines().any(|l| l == line))
            .count()
    }
}

fn config(listen: std::net::SocketAddr, origin: std::net::SocketAddr) -> String {
    format!(
        r#"
drain_timeout = "2s"
epoch_header = true

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_tells_systemd_about_start_reloads_stop_and_health() {
    let origin = Origin::start("origin").await;
    let listen = free_addr();
    let notify = NotifySocket::bind(None);
    let env = vec![
        ("NOTIFY_SOCKET".to_owned(), notify.address.clone()),
        ("WATCHDOG_USEC".to_owned(), "1000000".to_owned()),
    ];
    let good = config(listen, origin.addr);
    let mut supervisor = Supervisor::start_with(
        &good,
        &[],
        &Options {
            binary: None,
            env,
            ..Options::default()
        },
    );
    assert!(
        wait_until(WAIT, || notify.lifecycle() == ["READY=1"]),
        "{:?}",
        notify.all()
    );
    let ready = notify
        .all()
        .into_iter()
        .find(|m| m.starts_with("READY=1"))
        .unwrap();
    assert!(
        ready.contains(&format!("MAINPID={}", supervisor.pid())),
        "{ready}"
    );
    assert!(ready.contains("STATUS=generation 0 active"), "{ready}");

    assert_eq!(supervisor.reload().code, Some(0));
    supervisor.write_config(&good.edit("address = \"127", "adress = \"127"));
    assert_eq!(supervisor.reload().code, Some(1));
    assert!(
        wait_until(WAIT, || notify.lifecycle().len() >= 5),
        "{:?}",
        notify.all()
    );
    let reloading = notify
        .all()
        .into_iter()
        .find(|m| m.starts_with("RELOADING=1"))
        .unwrap();
    assert!(reloading.contains("\nMONOTONIC_USEC="), "{reloading}");
    assert!(
        notify
            .all()
            .iter()
            .any(|m| m.contains("STATUS=generation 1 active") && m.contains("last reload: failed")),
        "the status line says the last reload failed: {:?}",
        notify.all()
    );

    // A failure whose text holds line breaks (a config value quoted in the error) cannot add
    // fields to the message: the supervisor may be root, the text comes from a config file and
    // an unprivileged generation.
    supervisor.write_config(&good.edit(
        &format!("address = \"{listen}\""),
        "address = \"x\\nMAINPID=1\\nSTOPPING=1\"",
    ));
    let out = supervisor.reload();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("MAINPID=1"), "{}", out.stderr);
    assert!(
        wait_until(WAIT, || notify
            .all()
            .iter()
            .any(|m| m.contains("STATUS=") && m.contains("MAINPID=1"))),
        "{:?}",
        notify.all()
    );
    assert!(
        !notify
            .all()
            .iter()
            .flat_map(|m| m.lines().map(str::to_owned).collect::<Vec<_>>())
            .any(|l| l == "MAINPID=1" || l == "STOPPING=1"),
        "no field injected: {:?}",
        notify.all()
    );

    // The watchdog is pinged every half period while the active generation reports.
    let pings = notify.count("WATCHDOG=1");
    assert!(wait_until(WAIT, || notify.count("WATCHDOG=1") >= pings + 2));
    // A wedged active generation (stopped here) stops the pings, so systemd would restart.
    let active = supervisor.active_pid().unwrap();
    kill(Pid::from_raw(active as i32), Signal::SIGSTOP).unwrap();
    assert!(
        supervisor.wait_for_log("not pinging the watchdog", WAIT),
        "{}",
        supervisor.log()
    );
    let stalled = notify.count("WATCHDOG=1");
    // Three ping periods: long enough to see that none come.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        notify.count("WATCHDOG=1"),
        stalled,
        "no ping for a wedged generation"
    );
    kill(Pid::from_raw(active as i32), Signal::SIGCONT).unwrap();
    assert!(
        wait_until(WAIT, || notify.count("WATCHDOG=1") > stalled),
        "pings resume"
    );

    supervisor.write_config(&good);
    supervisor.signal(Signal::SIGTERM);
    assert!(supervisor.wait_exit(WAIT).is_some_and(|s| s.success()));
    assert_eq!(
        notify.lifecycle(),
        [
            "READY=1",
            "RELOADING=1",
            "READY=1",
            "RELOADING=1",
            "READY=1",
            "RELOADING=1",
            "READY=1",
            "STOPPING=1"
        ],
        "{:?}",
        notify.all()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_reaches_an_abstract_socket() {
    let listen = free_addr();
    let name = format!("baton-test-notify-{}-{}", std::process::id(), listen.port());
    let notify = NotifySocket::bind(Some(&name));
    let config = format!(
        "[[listener]]\nname = \"l\"\naddress = \"{listen}\"\nprotocol = \"http\"\n[[listener.route]]\ndirect_response = {{ status = 200 }}\n"
    );
    let env = vec![("NOTIFY_SOCKET".to_owned(), notify.address.clone())];
    let _supervisor = Supervisor::start_with(
        &config,
        &[],
        &Options {
            binary: None,
            env,
            ..Options::default()
        },
    );
    assert!(
        wait_until(WAIT, || notify.lifecycle() == ["READY=1"]),
        "{:?}",
        notify.all()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisor_upgrades_itself_under_load_without_losing_a_request() {
    let origin = Origin::start("origin").await;
    let listen = free_addr();
    let baton = std::fs::read(baton_tests::binaries::supervisor()).unwrap();
    // Long drains, so that the generation drained by the first reload is still there when the
    // supervisor upgrades: it must be handed over too.
    let with_proxy = format!(
        "{}\n[supervisor]\ncontrol_socket = \"baton.sock\"\nproxy_binary = \"{}\"\n",
        config(listen, origin.addr).edit(
            "drain_timeout = \"2s\"",
            "drain_timeout = \"20s\"\ndrain_idle_grace = \"30s\""
        ),
        baton_tests::binaries::proxy().display()
    );
    let supervisor = Supervisor::start_with(
        &with_proxy,
        &[("baton", &baton)],
        &Options {
            binary: Some("baton".into()),
            ..Options::default()
        },
    );
    let load = Load::start(listen, "/x", Mode::KeepAlive, 4, Duration::from_secs(120));
    assert!(wait_until(WAIT, || load.snapshot().ok > 50));
    // An idle keep-alive connection keeps generation 0 draining after the reload.
    let mut idle = baton_tests::client::H1::connect(listen).await.unwrap();
    assert_eq!(
        idle.get("/idle").await.unwrap().header("x-baton-epoch"),
        Some("0")
    );
    assert_eq!(supervisor.reload().code, Some(0));
    assert_eq!(
        supervisor.generations().len(),
        2,
        "generation 0 drains, 1 is active"
    );
    let before = supervisor.status();
    let old_build = before["supervisor_build"].as_str().unwrap().to_owned();

    // Install a new build the way a package manager does, then SIGUSR2.
    let installed = supervisor.dir().join("baton");
    let staged = supervisor.dir().join(".baton.new");
    std::fs::write(&staged, baton_tests::rebuilt(&baton, &old_build)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&staged, &installed).unwrap();
    supervisor.signal(Signal::SIGUSR2);
    assert!(
        wait_until(WAIT, || supervisor
            .command("status", &["--json"])
            .stdout
            .contains("supervisor_build")
            && supervisor.status()["supervisor_build"] != old_build),
        "the new build took over:\n{}",
        supervisor.log()
    );
    let after = supervisor.status();
    assert_eq!(
        after["supervisor_pid"],
        supervisor.pid(),
        "same pid: systemd sees the same main process"
    );
    let epochs = |status: &serde_json::Value| -> Vec<(u64, u64)> {
        status["generations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| (g["epoch"].as_u64().unwrap(), g["pid"].as_u64().unwrap()))
            .collect()
    };
    assert_eq!(
        epochs(&after),
        epochs(&before),
        "every generation is still listed"
    );
    assert_eq!(after["supervisor_upgrades"], 1, "{after}");

    let start = load.snapshot().ok;
    assert!(
        wait_until(WAIT, || load.snapshot().ok > start + 50),
        "serving goes on"
    );
    let out = supervisor.reload();
    assert_eq!(
        out.code,
        Some(0),
        "the new supervisor reloads: {}",
        out.stderr
    );
    let start = load.snapshot().ok;
    assert!(wait_until(WAIT, || load.snapshot().ok > start + 50));
    let report = load.stop().await;
    assert_eq!(report.failures(), 0, "{report:?}\n{}", supervisor.log());
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_sockets_go_to_the_fd_store() {
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

    let listen = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let config = format!(
        "[[listener]]\nname = \"l\"\naddress = \"{listen}\"\nprotocol = \"http\"\n[[listener.route]]\ndirect_response = {{ status = 200 }}\n[supervisor]\ncontrol_socket = \"baton.sock\"\nfd_store = true\n"
    );
    let env = vec![("NOTIFY_SOCKET".to_owned(), path.display().to_string())];
    let _supervisor = Supervisor::start_with(
        &config,
        &[],
        &Options {
            binary: None,
            env,
            ..Options::default()
        },
    );

    let wanted = format!(
        "FDSTORE=1\nFDNAME=baton_tcp_{}_{}",
        listen.ip(),
        listen.port()
    );
    let mut stored = None;
    let found = wait_until(WAIT, || {
        let mut buf = [0u8; 1024];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let Ok(msg) = recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        ) else {
            return false;
        };
        let fds: Vec<i32> = msg
            .cmsgs()
            .unwrap()
            .filter_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => Some(fds),
                _ => None,
            })
            .flatten()
            .collect();
        let text = String::from_utf8_lossy(iov[0].as_ref())
            .trim_end_matches('\0')
            .to_owned();
        if text.starts_with(&wanted) && fds.len() == 1 {
            stored = Some(fds[0]);
            true
        } else {
            false
        }
    });
    assert!(found, "no {wanted:?} with an fd");
    // SAFETY: the kernel just installed this fd in our process with the message.
    let fd =
        unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(stored.unwrap()) };
    let listener = std::net::TcpListener::from(fd);
    assert_eq!(
        listener.local_addr().unwrap(),
        listen,
        "the stored fd is the listen socket"
    );
}
