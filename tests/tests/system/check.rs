//! What `baton check` and `baton reload` say of the mistakes operators make most: a misspelt
//! field (with the name meant), an endpoint written as a URL (with the fixed form).

use std::path::Path;
use std::process::Command;

use baton_tests::client;
use baton_tests::config::Edit;
use baton_tests::free_addr;
use baton_tests::supervisor::Supervisor;
use baton_tests::upstream::Origin;

/// A valid file: a listener, a route, a cluster, and the supervisor's own table.
fn config(listen: &str, endpoint: &str) -> String {
    format!(
        r#"instance = "check"

[[listener]]
name = "public"
address = "{listen}"
protocol = "http"

[[listener.route]]
cluster = "app"

[[cluster]]
name = "app"
endpoints = ["{endpoint}"]

[supervisor]
readiness_timeout = "10s"
"#
    )
}

/// `baton check` (the real binary) on `text`: exit code and stderr.
fn check(text: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.toml");
    std::fs::write(&path, text).unwrap();
    check_file(&path)
}

fn check_file(path: &Path) -> (Option<i32>, String) {
    let out = Command::new(baton_tests::binaries::supervisor())
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_valid_file_is_said_valid_by_baton_in_its_own_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.toml");
    std::fs::write(&path, config("127.0.0.1:18080", "127.0.0.1:18081")).unwrap();
    let out = Command::new(baton_tests::binaries::supervisor())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("baton: {} is valid\n", path.display()),
        "one line, from the command the user ran"
    );
}

#[test]
fn a_misspelt_field_is_answered_with_the_name_meant_by_either_checker() {
    let good = config("127.0.0.1:18080", "127.0.0.1:18081");
    assert_eq!(check(&good).0, Some(0), "{}", check(&good).1);

    // The proxy's part of the file (checked by `baton-proxy --check`)...
    let (code, stderr) = check(&good.edit("address =", "adress ="));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "baton.toml:5:1: unknown field `adress` (did you mean `address`?), expected one of `name`, `address`, `fd_name`,"
        ) && stderr.contains("(in `adress = \"127.0.0.1:18080\"`)"),
        "{stderr}"
    );
    // ... and the supervisor's (checked by `baton` itself) read alike.
    let (code, stderr) = check(&good.edit("readiness_timeout", "readyness_timeout"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "baton.toml:16:1: unknown field `readyness_timeout` (did you mean `readiness_timeout`?), expected one of `proxy_binary`,"
        ) && stderr.contains("(in `readyness_timeout = \"10s\"`)"),
        "{stderr}"
    );
    // A misspelt value of a known set.
    let (code, stderr) = check(&good.edit("protocol = \"http\"", "protocol = \"htttp\""));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("unknown variant `htttp` (did you mean `http`?)"),
        "{stderr}"
    );
}

#[test]
fn a_far_off_field_gets_no_suggestion() {
    let good = config("127.0.0.1:18080", "127.0.0.1:18081");
    for (from, to) in [
        ("address =", "bandwidth = 3\naddress ="),
        ("readiness_timeout", "colour = \"red\"\nreadiness_timeout"),
    ] {
        let (code, stderr) = check(&good.edit(from, to));
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains("unknown field `"), "{stderr}");
        assert!(stderr.contains("expected one of"), "{stderr}");
        assert!(!stderr.contains("did you mean"), "{stderr}");
    }
}

#[test]
fn an_endpoint_written_as_a_url_is_named_with_its_fixed_form() {
    let cases = [
        (
            "http://127.0.0.1:8081",
            "cluster `app`: endpoint `http://127.0.0.1:8081` is a URL; endpoints are `host:port`, without `http://`: write \"127.0.0.1:8081\"",
        ),
        (
            "https://127.0.0.1:8443/api",
            "write \"127.0.0.1:8443\" (baton has no TLS to upstreams: name a port where the upstream takes cleartext HTTP); the path `/api` has no place here",
        ),
        ("http://localhost", "write \"localhost:80\""),
    ];
    for (endpoint, words) in cases {
        let (code, stderr) = check(&config("127.0.0.1:18080", endpoint));
        assert_eq!(code, Some(1), "{endpoint}: {stderr}");
        assert!(stderr.contains("baton.toml:13:"), "{endpoint}: {stderr}");
        assert!(stderr.contains(words), "{endpoint}: {stderr}");
        assert!(
            !stderr.contains("resolve"),
            "{endpoint}: no DNS error: {stderr}"
        );
    }
    // A listen address too.
    let (code, stderr) = check(&config("http://127.0.0.1:18080", "127.0.0.1:18081"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("listener.address: `http://127.0.0.1:18080` is a URL; an address is `IP:PORT`, without `http://`: write \"127.0.0.1:18080\""),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_an_endpoint_written_as_a_url_fails_and_the_old_generation_serves_on() {
    let origin = Origin::start("origin").await;
    let listen = free_addr();
    let good = config(&listen.to_string(), &origin.addr.to_string())
        .without("[supervisor]\nreadiness_timeout = \"10s\"\n");
    let supervisor = Supervisor::start(&good);
    assert_eq!(client::get(listen, "/").await.status, 200);

    supervisor.write_config(&good.edit(
        &format!("\"{}\"", origin.addr),
        &format!("\"http://{}\"", origin.addr),
    ));
    let out = supervisor.reload();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "endpoint `http://{0}` is a URL; endpoints are `host:port`, without `http://`: write \"{0}\"",
            origin.addr
        )),
        "{out:?}"
    );
    // The old generation serves on, alone.
    let generations = supervisor.generations();
    assert_eq!(generations.len(), 1, "{generations:?}");
    assert_eq!(generations[0].0, 0);
    assert_eq!(generations[0].2, "active");
    assert_eq!(client::get(listen, "/").await.status, 200);
}
