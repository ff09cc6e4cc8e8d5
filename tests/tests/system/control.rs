use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use baton_tests::config::Edit;
use baton_tests::supervisor::{Options, Outcome, Supervisor};
use baton_tests::{blocking, client, free_addr};

use crate::privileges::test_user;

fn config(listen: SocketAddr) -> String {
    format!(
        "instance = \"control\"\n\n[[listener]]\nname = \"l\"\naddress = \"{listen}\"\nprotocol = \"http\"\n\n[[listener.route]]\ndirect_response = {{ status = 200, body = \"up\\n\" }}\n"
    )
}

/// Runs `baton <args>` with `env`, as `user` (uid, gid) when given.
fn baton(args: &[&str], env: &[(&str, &Path)], user: Option<(u32, u32)>) -> Outcome {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(baton_tests::binaries::supervisor());
    command
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    if let Some((uid, gid)) = user {
        // std drops the supplementary groups too when root changes to another uid.
        command.uid(uid).gid(gid);
    }
    let output = blocking(|| command.output().expect("baton can be run"));
    Outcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: tries the control socket as another user"]
async fn only_root_and_the_supervisors_user_may_use_the_control_socket() {
    let other = test_user();
    let listen = free_addr();
    // A folder every user may enter, so that only the socket's own mode keeps others out.
    let supervisor = Supervisor::start_with(
        &config(listen),
        &[],
        &Options {
            shared_dir: true,
            ..Options::default()
        },
    );
    let socket = supervisor.socket.to_str().unwrap().to_owned();
    let (before, generations) = (supervisor.status(), supervisor.generations());
    let mode = std::fs::metadata(&supervisor.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the control socket is mode 0600");

    let out = baton(&["stop", "--socket", &socket], &[], Some(other));
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("not allowed to use")
            && out
                .stderr
                .contains("run as the user that runs `baton run`, or as root"),
        "{}",
        out.stderr
    );

    // Loosened by hand (or reachable through a folder's ACL), the socket lets the other user
    // connect, and the supervisor refuses the peer itself: the command says why, every time.
    std::fs::set_permissions(&supervisor.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let refusal = format!(
        "user {} may not control this supervisor (only root and user 0 may)",
        other.0
    );
    for command in ["stop", "reload", "status", "reopen-logs", "drain"] {
        for _ in 0..5 {
            let out = baton(&[command, "--socket", &socket], &[], Some(other));
            assert_eq!(out.code, Some(1), "{command}: {}{}", out.stdout, out.stderr);
            assert_eq!(
                out.stderr.trim(),
                format!("baton: {refusal}"),
                "{command}: the supervisor's reason, not an error of the pipe"
            );
        }
    }
    assert!(
        supervisor.log().contains("refused a control connection"),
        "{}",
        supervisor.log()
    );

    // None of it was carried out.
    let after = supervisor.status();
    for field in ["reloads", "drained", "active_epoch"] {
        assert_eq!(after[field], before[field], "{field}: {before} -> {after}");
    }
    assert_eq!(supervisor.generations(), generations);
    assert_eq!(client::get(listen, "/").await.text(), "up\n");
}

/// Writes `text` over the config file, keeping the line the harness added for the socket.
fn break_config(supervisor: &Supervisor, text: &str) {
    let good = std::fs::read_to_string(&supervisor.config_path).unwrap();
    std::fs::write(&supervisor.config_path, format!("{good}\n{text}\n")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_find_the_supervisor_while_its_config_does_not_parse() {
    let listen = free_addr();
    let supervisor = Supervisor::start(&config(listen));
    let path = supervisor.config_path.to_str().unwrap().to_owned();
    let socket = supervisor.socket.display().to_string();
    // Half-way through an edit: a table header not closed.
    break_config(&supervisor, "[[listener]\nname = \"next\"");

    let out = baton(&["status", "--config", &path], &[], None);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("instance control"), "{}", out.stdout);
    assert!(
        out.stderr.contains(&format!("{path}:"))
            && out.stderr.contains(&format!(
                "using the control socket the file names, {socket}"
            )),
        "says that it fell back and why: {}",
        out.stderr
    );

    // A reload reads the same broken file: it fails with the line, and nothing changes.
    let out = baton(&["reload", "--config", &path], &[], None);
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains(&format!("{path}:")),
        "the reload's failure names the file: {}",
        out.stderr
    );
    assert_eq!(client::get(listen, "/").await.text(), "up\n");
    let generations = supervisor.generations();
    assert_eq!(generations.len(), 1, "{generations:?}");
    assert_eq!((generations[0].0, generations[0].2.as_str()), (0, "active"));

    // A mistake TOML can read past (a field the supervisor does not know) falls back the same.
    std::fs::write(
        &supervisor.config_path,
        std::fs::read_to_string(&supervisor.config_path)
            .unwrap()
            .edit("[[listener]\nname = \"next\"", "readyness_timeout = \"1s\""),
    )
    .unwrap();
    let out = baton(&["stop", "--config", &path], &[], None);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("unknown field `readyness_timeout`"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_readable_socket_path_commands_use_the_default_one_of_the_instance() {
    let listen = free_addr();
    // The socket where a supervisor under systemd puts it: $RUNTIME_DIRECTORY/<instance>.sock.
    let runtime = tempfile::tempdir().unwrap();
    let env = [("RUNTIME_DIRECTORY", runtime.path())];
    let supervisor = Supervisor::start_with(
        &format!("{}\n[supervisor]\nmax_draining = 2\n", config(listen)),
        &[],
        &Options {
            env: vec![(
                "RUNTIME_DIRECTORY".into(),
                runtime.path().display().to_string(),
            )],
            ..Options::default()
        },
    );
    let default = runtime.path().join("control.sock");
    assert!(default.exists(), "the supervisor listens on {default:?}");
    let path = supervisor.config_path.to_str().unwrap().to_owned();
    // The instance line is still readable; what follows is not.
    break_config(&supervisor, "concurrency = = 2");

    let out = baton(&["status", "--config", &path], &env, None);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("instance control"), "{}", out.stdout);
    assert!(
        out.stderr.contains(&format!(
            "using the default control socket of instance `control`, {}",
            default.display()
        )),
        "{}",
        out.stderr
    );

    // Another broken file of the same instance leads to the same socket: a command that
    // changes something sees that the supervisor there runs another file, and does nothing.
    let other = supervisor.dir().join("other.toml");
    std::fs::write(&other, "instance = \"control\"\nconcurrency = = 1\n").unwrap();
    let out = baton(&["stop", "--config", other.to_str().unwrap()], &env, None);
    assert_eq!(out.code, Some(64), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "runs {path}, not {}; nothing was done",
            other.display()
        )),
        "{}",
        out.stderr
    );
    let out = baton(
        &["status", "--socket", default.to_str().unwrap()],
        &[],
        None,
    );
    assert!(
        out.stdout.contains("active"),
        "still running: {}",
        out.stdout
    );

    // Nothing readable at all (the file is gone): the default instance's socket, said so.
    let gone = supervisor.dir().join("gone.toml");
    let out = baton(&["status", "--config", gone.to_str().unwrap()], &env, None);
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    let fallback = runtime.path().join("baton.sock");
    assert!(
        out.stderr.contains("cannot read the config file")
            && out.stderr.contains(&format!(
                "using the default control socket of instance `baton`, {}",
                fallback.display()
            ))
            && out.stderr.contains(&format!(
                "no supervisor is listening on {}",
                fallback.display()
            )),
        "{}",
        out.stderr
    );
}

/// `baton run` on a config whose control socket is in `folder`, with a deadline: it stays up
/// if it takes the folder, which the tests below must not let it do.
fn run_with_socket_in(folder: &Path) -> Outcome {
    let path = folder.parent().unwrap().join("baton.toml");
    let text = format!(
        "{}\n[stats]\npath = \"stats.shm\"\n[supervisor]\ncontrol_socket = \"{}\"\n",
        config(free_addr()),
        folder.join("baton.sock").display()
    );
    std::fs::write(&path, text).unwrap();
    let mut child = Command::new(baton_tests::binaries::supervisor())
        .args(["run", "--config", path.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exited = baton_tests::wait_until(crate::WAIT, || matches!(child.try_wait(), Ok(Some(_))));
    if !exited {
        let _ = child.kill();
    }
    let output = child.wait_with_output().unwrap();
    Outcome {
        code: output.status.code(),
        stdout: String::new(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A control socket's folder others may write to: `baton run` refuses it and says why, before
/// it binds anything.
#[test]
fn a_control_socket_folder_others_could_take_over_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("baton-sockets");
    std::fs::create_dir(&folder).unwrap();
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = run_with_socket_in(&folder);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("is writable by other users"),
        "{}",
        out.stderr
    );
    assert!(
        !folder.join("baton.sock").exists(),
        "nothing was bound there"
    );
}

/// The control socket's folder another user made first (`/tmp/baton-<uid>` is guessable):
/// `baton run` refuses it and says why, before it binds anything.
#[test]
#[ignore = "needs root: gives the socket's folder to another user"]
fn a_control_socket_folder_another_user_made_is_refused() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (it gives a folder to another user): run it as root, or leave out --ignored"
    );
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("baton-sockets");
    std::fs::create_dir(&folder).unwrap();
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o700)).unwrap();
    nix::unistd::chown(&folder, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let out = run_with_socket_in(&folder);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("belongs to uid 65534, not to this user"),
        "{}",
        out.stderr
    );
    assert!(
        !folder.join("baton.sock").exists(),
        "nothing was bound there"
    );
}

/// `--log-format json`: every line the service writes is a JSON object, the generations' as
/// well as the supervisor's, through a reload and a stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_log_format_json_every_line_is_json() {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_addr();
    let path = dir.path().join("baton.toml");
    let socket = dir.path().join("baton.sock");
    std::fs::write(
        &path,
        format!(
            "{}\n[stats]\npath = \"stats.shm\"\n[supervisor]\ncontrol_socket = \"{}\"\n",
            config(listen),
            socket.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("baton.log");
    let mut child = Command::new(baton_tests::binaries::supervisor())
        .args(["run", "--log-format", "json", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::options()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap(),
        )
        .spawn()
        .unwrap();
    let served = baton_tests::wait_until_async(crate::WAIT, || async {
        client::try_get(listen, "/").await.is_ok()
    })
    .await;
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(served, "{}", text());
    let out = baton(&["reload", "--socket", socket.to_str().unwrap()], &[], None);
    assert_eq!(out.code, Some(0), "{out:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(baton_tests::wait_until(crate::WAIT, || matches!(
        child.try_wait(),
        Ok(Some(_))
    )));
    let text = text();
    let mut messages = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{text}"));
        let message = value["fields"]["message"].as_str().unwrap_or_default();
        // Each line says which process wrote it: the supervisor (`baton::…`) or a generation
        // (`baton_proxy::…`), so that their `ready` and `exited` lines are told apart.
        let target = value["target"].as_str().unwrap_or_default();
        let from_generation = matches!(message, "joined the supervisor" | "drained");
        assert!(
            target.starts_with(if from_generation {
                "baton_proxy::"
            } else {
                "baton"
            }),
            "{line}"
        );
        if message == "supervisor exited" {
            assert!(target.starts_with("baton::"), "{line}");
        }
        messages.push(message.to_owned());
    }
    // The generations' own lines are among them (only a generation says "joined the supervisor").
    assert!(
        messages
            .iter()
            .filter(|m| *m == "joined the supervisor")
            .count()
            >= 2,
        "{text}"
    );
    assert!(messages.iter().any(|m| m == "supervisor exited"), "{text}");
}

/// A first generation that cannot start makes `baton run` exit as the README says, not 0
/// (runit's `finish` and systemd see a failure): 1 when its port is taken, 64 when the proxy
/// refuses its part of the config (a bad config, as for the supervisor's part), so that runit's
/// `finish` hint for a bad config fires. The log says "first start failed", once.
#[test]
fn baton_run_exits_1_or_64_when_its_first_generation_cannot_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.toml");
    let cases = [
        (
            config(taken.local_addr().unwrap()),
            1,
            "Address already in use",
        ),
        (
            config(free_addr()).edit("protocol = \"http\"", "protocol = \"http\"\nbogus = 1"),
            64,
            "unknown field `bogus`",
        ),
    ];
    for (text, code, reason) in cases {
        std::fs::write(
            &path,
            format!(
                "{text}\n[stats]\npath = \"stats.shm\"\n[supervisor]\ncontrol_socket = \"baton.sock\"\n"
            ),
        )
        .unwrap();
        let mut child = Command::new(baton_tests::binaries::supervisor())
            .args(["run", "--config", path.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut status = None;
        baton_tests::wait_until(crate::WAIT, || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        if status.is_none() {
            let _ = child.kill();
        }
        let mut log = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
        assert_eq!(status.and_then(|s| s.code()), Some(code), "{text}\n{log}");
        assert!(log.contains("first start failed: "), "{log}");
        assert!(!log.contains("reload failed"), "{log}");
        assert_eq!(
            log.matches(reason).count(),
            1,
            "the reason is logged once, by the supervisor:\n{log}"
        );
    }
}

/// `baton status` counts reloads, not the first start, and the supervisor's line for a
/// generation's exit gives the connections it closed unfinished as the generation counted them
/// at the end of its drain (its last load report, up to half a second old, may still count a
/// client that has left since). A reload's failure is logged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_exit_lines_count_what_clients_hold() {
    let listen = free_addr();
    let supervisor = Supervisor::start(&config(listen));
    let status = supervisor.status();
    assert_eq!(status["reloads"], 0, "no reload yet: {status}");
    assert!(status["last_reload"].is_null(), "no reload yet: {status}");
    let text = supervisor.command("status", &[]).stdout;
    assert!(
        text.contains("reloads 0,") && !text.contains("last reload"),
        "{text}"
    );

    // A client with a kept-alive connection, seen by a load report.
    let mut h1 = client::H1::connect(listen).await.unwrap();
    assert_eq!(h1.get("/").await.unwrap().status, 200);
    assert!(
        baton_tests::wait_until(crate::WAIT, || {
            supervisor.status()["generations"][0]["connections"] == 1
        }),
        "the connection is counted"
    );
    let out = supervisor.reload();
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    // The drain closes the idle connection and ends at once, well before the next load
    // report: nothing was left behind.
    drop(h1);
    assert!(
        supervisor.wait_for_log(" exited epoch=0 pid=", crate::WAIT),
        "{}",
        supervisor.log()
    );
    let log = supervisor.log();
    let line = log
        .lines()
        .find(|l| l.contains(" exited epoch=0 pid="))
        .unwrap();
    assert!(line.contains("connections_left=0"), "{line}");
    let status = supervisor.status();
    assert_eq!(status["reloads"], 1, "{status}");
    assert_eq!(status["last_reload"], "generation 1 is active", "{status}");

    // A config the proxy refuses: the reason in the log once, as "reload failed".
    supervisor.write_config(
        &config(listen).edit("protocol = \"http\"", "protocol = \"http\"\nbogus = 1"),
    );
    let out = supervisor.reload();
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    let log = supervisor.log();
    let told = log
        .lines()
        .filter(|l| !l.contains(" DEBUG ") && l.contains("unknown field `bogus`"))
        .count();
    assert_eq!(told, 1, "{log}");
    assert!(log.contains("ERROR reload failed: "), "{log}");
}
