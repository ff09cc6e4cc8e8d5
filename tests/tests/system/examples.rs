//! The example configs in `examples/`: each passes `baton check` (the real binary), and those
//! that need nothing else run and answer as their comments say, so that the examples cannot rot.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use baton_tests::client::{H1, request};
use baton_tests::free_addr;
use baton_tests::supervisor::Supervisor;
use baton_tests::tls::{self, TestCa};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Every `*.toml` of `examples/`, by file name.
fn example_configs() -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = std::fs::read_dir(examples())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    found.sort();
    found
}

/// Writes what the examples expect beside them into `dir`: the certificate pair
/// `examples/make-cert.sh` makes (here from a test CA, for `localhost`), and a folder for the
/// access logs they put under `/var/log/baton`. Returns the example's text with that folder.
fn prepare(dir: &Path, text: &str, ca: &TestCa) -> String {
    std::fs::create_dir_all(dir.join("tls")).unwrap();
    let leaf = ca.leaf(&["localhost"]);
    std::fs::write(dir.join("tls/cert.pem"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.join("tls/key.pem"), &leaf.key_pem).unwrap();
    std::fs::create_dir_all(dir.join("log")).unwrap();
    text.replace("/var/log/baton", &dir.join("log").display().to_string())
}

#[test]
fn every_example_config_passes_baton_check() {
    let configs = example_configs();
    let names: Vec<&str> = configs.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "quickstart.toml",
        "socket-activation.toml",
        "tls.toml",
        "upstreams.toml",
    ] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
    let ca = TestCa::new();
    let mut failures = Vec::new();
    for (name, text) in configs {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(&name);
        std::fs::write(&path, prepare(dir.path(), &text, &ca)).unwrap();
        let out = Command::new(baton_tests::binaries::supervisor())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        if !out.status.success() {
            failures.push(format!(
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The example's text with each of its `127.0.0.1:PORT` addresses moved to a free port (the
/// same one everywhere it is written), and the map from old to new.
fn on_free_ports(text: &str) -> (String, HashMap<String, String>) {
    let mut moved = HashMap::new();
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("127.0.0.1:") {
        let start = i + "127.0.0.1:".len();
        let digits = rest[start..].bytes().take_while(u8::is_ascii_digit).count();
        let old = &rest[i..start + digits];
        let new = moved
            .entry(old.to_owned())
            .or_insert_with(|| free_addr().to_string());
        out.push_str(&rest[..i]);
        out.push_str(new);
        rest = &rest[start + digits..];
    }
    out.push_str(rest);
    (out, moved)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_several_upstreams_example_routes_balances_and_splits_as_it_says() {
    let text = std::fs::read_to_string(examples().join("upstreams.toml")).unwrap();
    let (config, moved) = on_free_ports(&text);
    let public = moved["127.0.0.1:8180"].parse().unwrap();
    let supervisor = Supervisor::start(&config);

    let served_by = |reply: &baton_tests::client::Reply| {
        reply
            .header("x-served-by")
            .unwrap_or_else(|| panic!("{reply:?}"))
            .to_owned()
    };
    // /api/ is balanced over both endpoints of `api`.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let mut h1 = H1::connect(public).await.unwrap();
        let reply = h1.get("/api/users").await.unwrap();
        assert_eq!(reply.status, 200, "{reply:?}");
        seen.insert(served_by(&reply));
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["api-1", "api-2"],
        "{}",
        supervisor.log()
    );
    // The header route always takes the canary.
    let mut h1 = H1::connect(public).await.unwrap();
    for _ in 0..5 {
        let reply = h1
            .send(
                http::Request::builder()
                    .uri("/")
                    .header("host", "example.test")
                    .header("x-canary", "1")
                    .body(Default::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(served_by(&reply), "web-canary");
    }
    // Everything else is split 90/10 between web and the canary: mostly web.
    let mut web = 0;
    for _ in 0..50 {
        let reply = h1
            .send(request("GET", "example.test", "/", ""))
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
        let by = served_by(&reply);
        assert!(by == "web" || by == "web-canary", "{by}");
        web += usize::from(by == "web");
    }
    assert!(web >= 30, "web took {web} of 50");
    // Access log beside the config.
    assert!(
        baton_tests::wait_until(crate::WAIT, || std::fs::read_to_string(
            supervisor.dir().join("access.log")
        )
        .is_ok_and(|log| log.contains("\"GET /api/users HTTP/1.1\" 200"))),
        "the access log has the requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_example_serves_https_with_the_certificate_beside_it() {
    let ca = TestCa::new();
    let text = std::fs::read_to_string(examples().join("tls.toml")).unwrap();
    let (config, moved) = on_free_ports(&text);
    let https = moved["127.0.0.1:8443"].parse().unwrap();
    let leaf = ca.leaf(&["localhost"]);
    let supervisor = Supervisor::start_with_files(
        &config,
        &[
            ("tls/cert.pem", leaf.cert_pem.as_bytes()),
            ("tls/key.pem", leaf.key_pem.as_bytes()),
        ],
    );
    for (alpn, path, body) in [
        (&b"h2"[..], "/app", "app behind TLS\n"),
        (&b"http/1.1"[..], "/", "hello over TLS\n"),
    ] {
        let stream = tls::connect(https, ca.client_config(&[alpn]), "localhost")
            .await
            .unwrap();
        let reply = if alpn == b"h2" {
            baton_tests::client::H2::handshake(stream)
                .await
                .get("localhost", path)
                .await
                .unwrap()
        } else {
            H1::handshake(stream)
                .await
                .send(request("GET", "localhost", path, ""))
                .await
                .unwrap()
        };
        assert_eq!(reply.status, 200, "{reply:?}\n{}", supervisor.log());
        assert_eq!(reply.text(), body);
    }
}
