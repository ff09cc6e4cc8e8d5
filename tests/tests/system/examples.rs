//! The example configs in `examples/`: each passes `baton check` (the real binary), and those
//! that need nothing else run and answer as their comments say, so that the examples cannot rot.
//! And the README's contents and the guides' links lead to headings that are there.

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
    // Every example passes through here and only some log, so the path is replaced where it
    // is (not a checked `Edit`); none may name another folder under /var/log instead.
    let text = text.replace("/var/log/baton", &dir.join("log").display().to_string());
    assert!(
        !text.contains("/var/log/"),
        "an example logs under /var/log but not in /var/log/baton, which this test redirects:\n{text}"
    );
    text
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

/// The headings of a Markdown text and the anchors GitHub gives them: lower case, punctuation
/// but `-` and `_` dropped, spaces as `-`, and `-1`, `-2` after a repeated one.
fn headings(markdown: &str) -> Vec<(&str, String)> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        let Some(title) = line.strip_prefix('#').filter(|_| !fenced) else {
            continue;
        };
        let title = title.trim_start_matches('#').trim().to_lowercase();
        let anchor: String = title
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let n = seen.entry(anchor.clone()).or_insert(0);
        out.push((
            line,
            if *n == 0 {
                anchor.clone()
            } else {
                format!("{anchor}-{n}")
            },
        ));
        *n += 1;
    }
    out
}

/// Every `(#anchor)` and `(file#anchor)` link of `markdown` that does not lead anywhere.
fn broken_links(markdown: &str, here: &Path) -> Vec<String> {
    let mut broken = Vec::new();
    for (i, _) in markdown.match_indices("](") {
        let target = &markdown[i + 2..];
        let Some(end) = target.find(')') else {
            continue;
        };
        let target = &target[..end];
        if target.contains("://") {
            continue;
        }
        let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
        let file = if file.is_empty() {
            here.to_owned()
        } else {
            here.parent().unwrap().join(file)
        };
        let Ok(text) = std::fs::read_to_string(&file) else {
            broken.push(format!("{target}: no file {}", file.display()));
            continue;
        };
        if !anchor.is_empty() && !headings(&text).iter().any(|(_, a)| a == anchor) {
            broken.push(format!("{target}: no heading"));
        }
    }
    broken
}

#[test]
fn the_readme_contents_and_the_guide_link_to_what_is_there() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for doc in ["README.md", "docs/coming-from.md"] {
        let path = repo.join(doc);
        let text = std::fs::read_to_string(&path).unwrap();
        let broken = broken_links(&text, &path);
        assert!(broken.is_empty(), "{doc}: {broken:?}");
    }
    // Every section of the README is in its contents.
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let contents = &readme[readme.find("## Contents").unwrap()..];
    let contents = &contents[..contents[3..].find("\n## ").unwrap()];
    for (line, anchor) in headings(&readme) {
        if line.starts_with("## ") && anchor != "contents" {
            assert!(
                contents.contains(&format!("(#{anchor})")),
                "`{line}` is not in the contents"
            );
        }
    }
}
