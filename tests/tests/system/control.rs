use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

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
async fn only_root_and_the_supervisors_user_may_use_the_control_socket() {
    let Some(other) = test_user() else {
        return;
    };
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
