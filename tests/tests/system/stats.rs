use std::collections::HashMap;
use std::path::Path;

use baton_tests::client::{H1, request};
use baton_tests::proxy::Proxy;
use baton_tests::upstream::Origin;
use baton_tests::{baton_stats, free_addr, wait_until};
use nix::sys::signal::Signal;

use crate::{WAIT, http_config};

/// The text output of `baton-stats` (`name{tags}: value` lines) as `name{tags}` → value.
fn text_stats(region: &Path) -> HashMap<String, String> {
    let (code, out, err) = baton_stats(&["--path", region.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    out.lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(": ")?;
            Some((name.trim().to_owned(), value.trim().to_owned()))
        })
        .collect()
}

fn counter(region: &Path, name: &str) -> Option<u64> {
    text_stats(region).get(name)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baton_stats_reads_what_the_proxy_counted_in_every_format() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let proxy = Proxy::start(&http_config(listen, admin, origin.addr));
    let region = proxy.dir().join("stats.shm");
    let mut c = H1::connect(listen).await.unwrap();
    for i in 0..5 {
        assert_eq!(c.get(&format!("/p{i}")).await.unwrap().status, 200);
    }
    for _ in 0..2 {
        let r = c
            .send(request("GET", "direct.test", "/", ""))
            .await
            .unwrap();
        assert_eq!(r.status, 201);
    }
    let rq_2xx = "downstream_rq_2xx{listener=public,code_class=2xx}";
    assert!(
        wait_until(WAIT, || counter(&region, rq_2xx) == Some(7)),
        "{:?}",
        text_stats(&region)
    );

    // Text.
    let text = text_stats(&region);
    assert_eq!(text["downstream_rq_total{listener=public}"], "7");
    assert_eq!(text["downstream_cx_total{listener=public}"], "1");
    assert_eq!(text["downstream_cx_active{listener=public}"], "1");
    assert_eq!(text["upstream_rq_total{cluster=origin}"], "5");
    assert_eq!(text["upstream_cx_total{cluster=origin}"], "1");
    assert_eq!(text["server.live"], "1");
    assert_eq!(text["server.concurrency"], "2");
    let time = &text["downstream_rq_time{listener=public}"];
    assert!(time.starts_with("count=7 p50="), "{time}");
    assert!(time.contains(" p99=") && time.contains(" max="), "{time}");
    assert!(
        text["downstream_cx_rx_bytes_total{listener=public}"]
            .parse::<u64>()
            .unwrap()
            > 7 * 16
    );

    // JSON.
    let (code, out, err) = baton_stats(&["--path", region.to_str().unwrap(), "--format", "json"]);
    assert_eq!(code, Some(0), "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let find = |name: &str| {
        doc["stats"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name && s["tags"]["listener"] == "public")
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {out}"))
    };
    assert_eq!(find("downstream_rq_2xx")["value"], 7);
    assert_eq!(find("downstream_rq_2xx")["tags"]["code_class"], "2xx");
    assert_eq!(find("downstream_rq_2xx")["kind"], "counter");
    let h = find("downstream_rq_time");
    assert_eq!(
        (h["kind"].as_str(), h["unit"].as_str(), h["count"].as_u64()),
        (Some("histogram"), Some("us"), Some(7))
    );
    assert_eq!(doc["region"]["layout_version"], shm_stats::LAYOUT_VERSION);
    assert_eq!(
        doc["region"]["shards"].as_array().unwrap().len(),
        3,
        "two workers and the main thread"
    );
    assert!(
        doc["region"]["shards"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["pid"] == proxy.pid())
    );

    // Prometheus, checked as a scraper would.
    let (code, out, err) =
        baton_stats(&["--path", region.to_str().unwrap(), "--format", "prometheus"]);
    assert_eq!(code, Some(0), "{err}");
    let samples = check_exposition(&out);
    assert_eq!(
        samples[r#"baton_downstream_rq_2xx{listener="public",code_class="2xx"}"#],
        7.0
    );
    assert_eq!(samples[r#"baton_upstream_rq_total{cluster="origin"}"#], 5.0);
    assert_eq!(
        samples[r#"baton_downstream_rq_time_seconds_count{listener="public"}"#],
        7.0
    );
    assert_eq!(
        samples[r#"baton_downstream_rq_time_seconds_bucket{listener="public",le="+Inf"}"#],
        7.0
    );

    // The admin endpoints read the same region.
    let prom = baton_tests::client::get(admin, "/stats/prometheus").await;
    assert_eq!(
        prom.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(
        check_exposition(&prom.text())[r#"baton_upstream_rq_total{cluster="origin"}"#],
        5.0
    );
    let filtered = baton_tests::client::get(admin, "/stats?filter=%5Eupstream_rq_total")
        .await
        .text();
    assert_eq!(filtered, "upstream_rq_total{cluster=origin}: 5\n");
    let json = baton_tests::client::get(admin, "/stats?format=json")
        .await
        .json();
    assert!(json["stats"].as_array().unwrap().len() > 20);

    // A pattern selects by `name{tags}`.
    let (_, out, _) = baton_stats(&[
        "--path",
        region.to_str().unwrap(),
        "listener=public,code_class=5xx",
    ]);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.starts_with("downstream_rq_5xx{listener=public,code_class=5xx}"),
        "{out}"
    );
    // --watch prints again; --count bounds it.
    let (code, out, _) = baton_stats(&[
        "--path",
        region.to_str().unwrap(),
        "--watch",
        "0.05",
        "--count",
        "3",
        "server.live",
    ]);
    assert_eq!(code, Some(0));
    assert_eq!(out.matches("--- ").count(), 3, "{out}");
}

/// Checks Prometheus text exposition (0.0.4) the way a scraper reads it, and returns every
/// sample by `name{labels}`.
pub fn check_exposition(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    let mut typed: HashMap<String, String> = HashMap::new();
    let mut finished: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a name and a type");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(!typed.contains_key(name), "family {name} declared twice");
            assert!(
                !finished.contains(&name.to_owned()),
                "family {name} is not contiguous"
            );
            finished.push(current.clone());
            current = name.to_owned();
            typed.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| typed.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert_eq!(family, current, "sample {line} outside its family");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                for pair in labels[1..labels.len() - 1].split(',') {
                    let (k, v) = pair.split_once('=').expect("label=value");
                    assert!(
                        k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "{line}"
                    );
                    assert!(v.starts_with('"') && v.ends_with('"'), "{line}");
                }
            }
        }
        samples.insert(series.to_owned(), value);
    }
    // Histogram buckets are cumulative and end at +Inf with the count.
    for (family, kind) in &typed {
        if kind != "histogram" {
            continue;
        }
        let mut by_series: HashMap<String, Vec<f64>> = HashMap::new();
        for line in text
            .lines()
            .filter(|l| l.starts_with(&format!("{family}_bucket{{")))
        {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let key = series.split(",le=").next().unwrap().to_owned();
            by_series
                .entry(key)
                .or_default()
                .push(value.parse().unwrap());
        }
        for (series, counts) in by_series {
            assert!(
                counts.windows(2).all(|w| w[0] <= w[1]),
                "{series} buckets go down"
            );
            let labels = series.trim_start_matches(&format!("{family}_bucket"));
            let count_key = format!("{family}_count{}}}", labels.trim_end_matches('}'));
            let count_key = if labels == "{" {
                format!("{family}_count")
            } else {
                count_key
            };
            assert_eq!(
                Some(counts.last().unwrap()),
                samples.get(&count_key),
                "{series}: +Inf equals _count"
            );
        }
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_carry_on_across_restarts_and_crashes() {
    let origin = Origin::start("origin").await;
    let shared = tempfile::tempdir().unwrap();
    let region = shared.path().join("stats.shm");
    let (listen, admin) = (free_addr(), free_addr());
    let config = format!(
        "{}\n[stats]\npath = \"{}\"\n",
        http_config(listen, admin, origin.addr),
        region.display()
    );
    let total = "downstream_rq_total{listener=public}";

    let mut first = Proxy::start(&config);
    for _ in 0..3 {
        baton_tests::client::get(listen, "/").await;
    }
    assert!(wait_until(WAIT, || counter(&region, total) == Some(3)));
    first.signal(Signal::SIGTERM);
    assert!(first.wait_exit(WAIT).is_some_and(|s| s.success()));
    assert_eq!(
        counter(&region, total),
        Some(3),
        "a clean exit folds the counts in"
    );
    assert_eq!(
        counter(&region, "server.live"),
        Some(0),
        "its gauges stop counting"
    );

    let mut second = Proxy::start(&config);
    for _ in 0..2 {
        baton_tests::client::get(listen, "/").await;
    }
    assert!(wait_until(WAIT, || counter(&region, total) == Some(5)));
    second.signal(Signal::SIGKILL);
    second.wait_exit(WAIT).expect("killed");
    assert_eq!(
        counter(&region, total),
        Some(5),
        "a dead process's rows still count"
    );

    let third = Proxy::start(&config);
    assert!(
        third
            .log()
            .contains("retired the stats of processes that are gone"),
        "{}",
        third.log()
    );
    assert_eq!(
        counter(&region, "server.live"),
        Some(1),
        "the dead generation no longer counts as live"
    );
    baton_tests::client::get(listen, "/").await;
    assert!(
        wait_until(WAIT, || counter(&region, total) == Some(6)),
        "{:?}",
        text_stats(&region)
    );
}

#[test]
fn baton_stats_explains_what_is_wrong_with_a_region() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let check = |args: &[&str], code: i32, words: &str| {
        let (got, out, err) = baton_stats(args);
        assert_eq!(got, Some(code), "{args:?}: {out}{err}");
        assert!(
            err.contains(words),
            "{args:?}: expected `{words}` in: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    };
    check(&["--path", &path("none")], 1, "no stats region here");
    check(
        &["--instance", "no-such-instance-here"],
        1,
        "/dev/shm/baton.no-such-instance-here",
    );

    let random: Vec<u8> = (0..10_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(path("random"), &random).unwrap();
    check(&["--path", &path("random")], 1, "not a baton stats region");

    // A real region, then damaged copies of it.
    let region = shm_stats_region(dir.path());
    let good = std::fs::read(&region).unwrap();
    std::fs::write(path("truncated"), &good[..good.len() / 3]).unwrap();
    check(&["--path", &path("truncated")], 1, "truncated");
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&99u32.to_ne_bytes());
    std::fs::write(path("newer"), &newer).unwrap();
    check(&["--path", &path("newer")], 1, "layout version 99");

    check(
        &["--path", region.to_str().unwrap(), "(unclosed"],
        2,
        "not a valid regular expression",
    );
    check(&["--format", "xml"], 2, "invalid value 'xml'");
}

/// Makes a region the way the proxy does: by running one briefly.
fn shm_stats_region(dir: &Path) -> std::path::PathBuf {
    let region = dir.join("made.shm");
    let listen = free_addr();
    let mut proxy = Proxy::start(&format!(
        "[[listener]]\nname = \"l\"\naddress = \"{listen}\"\nprotocol = \"http\"\n[[listener.route]]\ndirect_response = {{ status = 200 }}\n[stats]\npath = \"{}\"\n",
        region.display()
    ));
    proxy.signal(Signal::SIGTERM);
    proxy.wait_exit(WAIT).expect("exits");
    region
}

#[test]
fn a_region_of_another_layout_stops_the_proxy_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let region = shm_stats_region(dir.path());
    let mut bytes = std::fs::read(&region).unwrap();
    let newer = shm_stats::LAYOUT_VERSION + 1;
    bytes[8..12].copy_from_slice(&newer.to_ne_bytes());
    std::fs::write(&region, &bytes).unwrap();
    let listen = free_addr();
    let log = Proxy::start_with(
        &format!(
            "[[listener]]\nname = \"l\"\naddress = \"{listen}\"\nprotocol = \"http\"\n[[listener.route]]\ndirect_response = {{ status = 200 }}\n[stats]\npath = \"{}\"\n",
            region.display()
        ),
        &[],
    )
    .err()
    .expect("the proxy refuses the region");
    assert!(log.contains(&format!("layout version {newer}")), "{log}");
    assert!(log.contains("stop the processes that use it"), "{log}");
    assert_eq!(
        std::fs::read(&region).unwrap(),
        bytes,
        "the region is left as it was"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_do_not_share_a_region_and_a_stale_region_says_so() {
    let shared = tempfile::tempdir().unwrap();
    let region = shared.path().join("stats.shm");
    let config = |listen: std::net::SocketAddr| {
        format!(
            "[[listener]]\nname = \"l\"\naddress = \"{listen}\"\nprotocol = \"http\"\n[[listener.route]]\ndirect_response = {{ status = 200 }}\n[stats]\npath = \"{}\"\n",
            region.display()
        )
    };
    let mut first = Proxy::start(&config(free_addr()));
    let log = Proxy::start_with(&config(free_addr()), &[])
        .err()
        .expect("a second proxy on the same region is refused");
    assert!(log.contains("is in use by another running baton"), "{log}");
    assert!(log.contains(&format!("pid {}", first.pid())), "{log}");

    first.signal(Signal::SIGTERM);
    first.wait_exit(WAIT).expect("exits");
    let (code, _, err) = baton_stats(&["--path", region.to_str().unwrap()]);
    assert_eq!(code, Some(0));
    assert!(err.contains("no process writes this region now"), "{err}");
}

/// `shm-stats/tools/read_stats.py`: a reader written from `shm-stats/LAYOUT.md` alone, in
/// another language, must find what `baton-stats` finds in a live region.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_reader_written_from_the_layout_document_agrees_with_baton_stats() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let proxy = Proxy::start(&http_config(listen, admin, origin.addr));
    let region = proxy.dir().join("stats.shm");
    let mut c = H1::connect(listen).await.unwrap();
    for i in 0..6 {
        assert_eq!(c.get(&format!("/p{i}")).await.unwrap().status, 200);
    }
    drop(c);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shm-stats/tools/read_stats.py");
    let python = |args: &[&str]| {
        baton_tests::blocking(|| {
            std::process::Command::new("python3")
                .arg(&script)
                .args(args)
                .output()
                .expect("python3 can be run")
        })
    };
    // Compared once the proxy is quiet: the connection closed and two reads of `baton-stats`
    // agree (the uptime gauge moves every second and is left out).
    let quiet = |text: &HashMap<String, String>| {
        text.get("downstream_cx_active{listener=public}")
            .is_some_and(|v| v == "0")
    };
    let mut agreed = false;
    for _ in 0..20 {
        let before = text_stats(&region);
        let out = python(&["--json", region.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let after = text_stats(&region);
        let strip = |m: &HashMap<String, String>| {
            let mut m = m.clone();
            m.remove("server.uptime");
            m
        };
        if !quiet(&after) || strip(&before) != strip(&after) {
            baton_tests::wait_until(WAIT, || quiet(&text_stats(&region)));
            continue;
        }
        let read: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&out.stdout).expect("JSON from the Python reader");
        assert_eq!(
            read.len(),
            after.len(),
            "the same stats: {:?} vs {:?}",
            read.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>()
        );
        for (name, value) in &after {
            let got = &read
                .get(name)
                .unwrap_or_else(|| panic!("the Python reader misses {name}"));
            if name == "server.uptime" {
                continue;
            }
            let got = match got {
                serde_json::Value::Object(h) => format!("count={}", h["count"]),
                other => other.to_string(),
            };
            let want = value.split(' ').next().unwrap();
            assert_eq!(got, want, "{name}");
        }
        assert_eq!(read["downstream_rq_total{listener=public}"], 6);
        agreed = true;
        break;
    }
    assert!(agreed, "the proxy never went quiet");

    let junk = proxy.dir().join("junk");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    let out = python(&[junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a baton stats region"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn baton_stats_refuses_what_is_not_a_file_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("stats.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for (path, kind) in [
        (fifo.as_path(), "is a named pipe (FIFO), not a stats region"),
        (dir.path(), "is a folder, not a stats region"),
        (
            Path::new("/dev/null"),
            "is a character device, not a stats region",
        ),
    ] {
        // Not `baton_stats`: a reader that blocks must fail the test, not hang it.
        let mut child = std::process::Command::new(baton_tests::binaries::stats())
            .arg("--path")
            .arg(path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let exited = wait_until(WAIT, || matches!(child.try_wait(), Ok(Some(_))));
        if !exited {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            exited,
            "baton-stats --path {path:?} still runs after {WAIT:?}"
        );
        assert_eq!(out.status.code(), Some(1), "{path:?}: {stderr}");
        assert!(
            stderr.contains(&format!("{}: {kind}", path.display())),
            "{path:?}: {stderr}"
        );
    }
}

/// Prometheus scrapes `/metrics` unless told otherwise: the admin listener serves the same
/// exposition there as at `/stats/prometheus`, with the same content type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_is_the_prometheus_exposition_where_prometheus_looks_by_default() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let _proxy = Proxy::start(&http_config(listen, admin, origin.addr));
    let mut c = H1::connect(listen).await.unwrap();
    for i in 0..3 {
        assert_eq!(c.get(&format!("/m{i}")).await.unwrap().status, 200);
    }
    drop(c);
    // Counted once each answer is complete: wait for the third.
    let counted = baton_tests::wait_until_async(WAIT, || async {
        let text = baton_tests::client::get(admin, "/metrics").await.text();
        text.contains("baton_downstream_rq_time_seconds_count{listener=\"public\"} 3\n")
    })
    .await;
    assert!(
        counted,
        "{}",
        baton_tests::client::get(admin, "/metrics").await.text()
    );

    let metrics = baton_tests::client::get(admin, "/metrics").await;
    assert_eq!(metrics.status, 200, "{}", metrics.text());
    assert_eq!(
        metrics.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let scraped = check_exposition(&metrics.text());
    assert_eq!(scraped[r#"baton_upstream_rq_total{cluster="origin"}"#], 3.0);
    assert_eq!(
        scraped[r#"baton_downstream_rq_time_seconds_count{listener="public"}"#],
        3.0
    );
    // The same series as `/stats/prometheus` (values such as the uptime may move in between).
    let legacy = baton_tests::client::get(admin, "/stats/prometheus").await;
    assert_eq!(
        legacy.header("content-type"),
        metrics.header("content-type")
    );
    let mut a: Vec<_> = scraped.keys().collect();
    let legacy = check_exposition(&legacy.text());
    let mut b: Vec<_> = legacy.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
}

/// `baton-stats` prints what the admin's `/stats` prints, in the same `name{tags}: value` form;
/// `--watch` adds each counter's rate per second since the print before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baton_stats_prints_as_the_admin_does_and_watch_shows_rates() {
    use std::io::BufRead;

    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let proxy = Proxy::start(&http_config(listen, admin, origin.addr));
    let region = proxy.dir().join("stats.shm");
    for i in 0..4 {
        assert_eq!(
            baton_tests::client::get(listen, &format!("/w{i}"))
                .await
                .status,
            200
        );
    }
    let total = "downstream_rq_total{listener=public}";
    assert!(wait_until(WAIT, || counter(&region, total) == Some(4)));

    // The same lines, name for name, as the admin's `/stats` (values such as the uptime move).
    let (code, out, err) = baton_stats(&["--path", region.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let admin_text = baton_tests::client::get(admin, "/stats").await.text();
    let names = |text: &str| -> Vec<String> {
        text.lines()
            .map(|l| {
                let (name, value) = l
                    .split_once(": ")
                    .unwrap_or_else(|| panic!("`{l}` is not `name{{tags}}: value`"));
                assert!(!name.contains(' ') && !value.is_empty(), "{l}");
                name.to_owned()
            })
            .collect()
    };
    assert_eq!(names(&out), names(&admin_text));
    assert!(out.contains(&format!("\n{total}: 4\n")), "{out}");

    // --watch: the first print has no rate (nothing to compare with), the second has one,
    // taken over the requests sent in between.
    let mut watch = std::process::Command::new(baton_tests::binaries::stats())
        .args([
            "--path",
            region.to_str().unwrap(),
            "--watch",
            "3",
            "--count",
            "2",
        ])
        .arg("^downstream_rq_total")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut next = move || baton_tests::blocking(|| lines.next().unwrap().unwrap());
    assert!(next().starts_with("--- "));
    assert_eq!(next(), format!("{total}: 4"));
    for i in 0..6 {
        assert_eq!(
            baton_tests::client::get(listen, &format!("/w{i}"))
                .await
                .status,
            200
        );
    }
    assert!(next().starts_with("--- "));
    let second = next();
    let (value, rate) = second
        .strip_prefix(&format!("{total}: "))
        .and_then(|rest| rest.strip_suffix("/s)"))
        .and_then(|rest| rest.split_once(" ("))
        .unwrap_or_else(|| panic!("`{second}` is not `{total}: N (R/s)`"));
    assert_eq!(value, "10", "{second}");
    let rate: f64 = rate.parse().unwrap();
    // Six requests over about three seconds (the watch interval, plus its own work).
    assert!(rate > 0.5 && rate <= 2.0, "{second}");
    assert!(
        baton_tests::blocking(move || watch.wait())
            .unwrap()
            .success()
    );
}
