//! Histogram buckets: the default bounds, a configured set (in the admin's `/metrics` and in
//! `baton-stats`, which reads the bounds from the region), bad sets refused with their line, a
//! reload that would change them refused, and a region an earlier release made replaced.

use std::net::SocketAddr;

use baton_tests::client;
use baton_tests::proxy::{Proxy, run_once};
use baton_tests::supervisor::Supervisor;
use baton_tests::upstream::Origin;
use baton_tests::{baton_stats, free_addr};

use crate::stats::check_exposition;
use crate::{WAIT, http_config};

/// The `le` labels of `series`'s buckets in an exposition, in order, and the count at `+Inf`.
fn buckets(exposition: &str, series: &str) -> (Vec<String>, f64) {
    let prefix = format!("{series},le=\"");
    let mut les = Vec::new();
    let mut total = f64::NAN;
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let (le, value) = rest.split_once("\"} ").expect("a bucket sample");
        if le == "+Inf" {
            total = value.parse().unwrap();
        }
        les.push(le.to_owned());
    }
    (les, total)
}

/// Waits until `/metrics` counts `n` answers in `downstream_rq_time`, and returns it.
async fn metrics_after(admin: SocketAddr, n: u64) -> String {
    let want = format!("baton_downstream_rq_time_seconds_count{{listener=\"public\"}} {n}\n");
    let counted = baton_tests::wait_until_async(WAIT, || async {
        client::get(admin, "/metrics").await.text().contains(&want)
    })
    .await;
    let text = client::get(admin, "/metrics").await.text();
    assert!(counted, "{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_buckets_run_from_half_a_millisecond_to_five_minutes() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let _proxy = Proxy::start(&http_config(listen, admin, origin.addr));
    for i in 0..3 {
        assert_eq!(client::get(listen, &format!("/h{i}")).await.status, 200);
    }
    let text = metrics_after(admin, 3).await;
    check_exposition(&text);
    let (les, total) = buckets(
        &text,
        "baton_downstream_rq_time_seconds_bucket{listener=\"public\"",
    );
    assert_eq!(
        les,
        [
            "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5",
            "1", "2.5", "5", "10", "30", "60", "300", "+Inf"
        ]
    );
    assert_eq!(total, 3.0);
    // The upstream histogram has the same buckets.
    let (les, _) = buckets(
        &text,
        "baton_upstream_rq_time_seconds_bucket{cluster=\"origin\"",
    );
    assert_eq!(les.len(), 18, "{les:?}");
}

fn supervised(listen: SocketAddr, admin: SocketAddr, origin: SocketAddr, buckets: &str) -> String {
    format!(
        "{}\n[stats]\npath = \"stats.shm\"\nhistogram_buckets = {buckets}\n",
        http_config(listen, admin, origin)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_buckets_are_what_every_reader_sees_and_a_reload_cannot_change_them() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let config = supervised(listen, admin, origin.addr, "[2.5, 1000, 60_000]");
    let supervisor = Supervisor::start(&config);
    let region = supervisor.dir().join("stats.shm");
    for i in 0..4 {
        assert_eq!(client::get(listen, &format!("/c{i}")).await.status, 200);
    }
    // Every answer on loopback takes less than a second: counted at le=1 and le=60.
    let text = metrics_after(admin, 4).await;
    let series = "baton_downstream_rq_time_seconds_bucket{listener=\"public\"";
    assert_eq!(buckets(&text, series).0, ["0.0025", "1", "60", "+Inf"]);
    let samples = check_exposition(&text);
    for le in ["1", "60", "+Inf"] {
        assert_eq!(samples[&format!("{series},le=\"{le}\"}}")], 4.0, "le={le}");
    }

    // baton-stats reads the bounds from the region, not from a config.
    let (code, out, err) =
        baton_stats(&["--path", region.to_str().unwrap(), "--format", "prometheus"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(buckets(&out, series).0, ["0.0025", "1", "60", "+Inf"]);
    let (code, out, err) = baton_stats(&["--path", region.to_str().unwrap(), "--format", "json"]);
    assert_eq!(code, Some(0), "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        doc["region"]["histogram_bounds"],
        serde_json::json!([2_500, 1_000_000, 60_000_000])
    );

    // Two generations of one region count into the same buckets: a reload that would change
    // them is refused, and the active generation serves on.
    let active = supervisor.active_pid();
    supervisor.write_config(&supervised(listen, admin, origin.addr, "[1, 10]"));
    let out = supervisor.reload();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains(
            "stats.histogram_buckets changed from [2.5, 1000, 60000] to [1, 10]; a reload cannot apply that"
        ),
        "{}",
        out.stderr
    );
    assert_eq!(supervisor.active_pid(), active);
    supervisor.write_config(&config);
    assert_eq!(supervisor.reload().code, Some(0));
    assert_eq!(client::get(listen, "/after").await.status, 200);
    let text = metrics_after(admin, 5).await;
    assert_eq!(buckets(&text, series).0, ["0.0025", "1", "60", "+Inf"]);
}

#[test]
fn bad_bucket_lists_are_refused_with_their_line_and_reason() {
    let base = format!(
        "[[listener]]\nname = \"l\"\naddress = \"{}\"\nprotocol = \"http\"\n[[listener.route]]\ndirect_response = {{ status = 200 }}\n[stats]\npath = \"stats.shm\"\n",
        free_addr()
    );
    let too_many: Vec<String> = (1..=33).map(|i| i.to_string()).collect();
    let too_many = format!("[{}]", too_many.join(", "));
    let cases = [
        (
            "[]",
            "stats.histogram_buckets: give at least one bucket bound",
        ),
        (
            "[1, 5, 5]",
            "stats.histogram_buckets: bucket bound 5 is not above the one before it (5): list the bounds from the smallest, each once",
        ),
        (
            "[10, 1]",
            "bucket bound 1 is not above the one before it (10)",
        ),
        (
            "[0, 1]",
            "a bucket bound is a number of milliseconds above 0",
        ),
        ("[-5]", "a bucket bound is a number of milliseconds above 0"),
        (
            "[0.0001]",
            "bucket bound 0.0001: histograms count in microseconds; give at most three decimals of a millisecond",
        ),
        (&too_many, "33 bucket bounds; at most 32"),
        ("[\"1ms\"]", "invalid type: string \"1ms\""),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.toml");
    for (list, message) in cases {
        let config = format!("{base}histogram_buckets = {list}\n");
        // The proxy's check, and the supervisor's (which reads `[stats]` itself).
        let output = run_once(&config, true);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{list}: {stderr}");
        assert!(stderr.contains("baton.toml:9:"), "{list}: {stderr}");
        assert!(stderr.contains(message), "{list}: {stderr}");
        std::fs::write(&path, &config).unwrap();
        let out = std::process::Command::new(baton_tests::binaries::supervisor())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{list}: {stderr}");
        assert!(stderr.contains("baton.toml:9:"), "{list}: {stderr}");
        assert!(stderr.contains(message), "{list}: {stderr}");
    }
    // Integers and fractions mix, as milliseconds.
    let output = run_once(
        &format!("{base}histogram_buckets = [0.25, 1, 30_000]\n"),
        true,
    );
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An upgrade from a release whose region had fixed log-linear buckets (layout version 1):
/// the supervisor starts, with a new region in the old one's place, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_an_earlier_release_made_is_replaced_at_start() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let dir = tempfile::tempdir().unwrap();
    let region = dir.path().join("old.shm");
    drop(shm_stats::Region::create_or_open(&region, shm_stats::Capacities::default()).unwrap());
    let mut bytes = std::fs::read(&region).unwrap();
    bytes[8..12].copy_from_slice(&1u32.to_ne_bytes());
    std::fs::write(&region, &bytes).unwrap();
    let (code, _, err) = baton_stats(&["--path", region.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("layout version 1"), "{err}");

    let supervisor = Supervisor::start(&format!(
        "{}\n[stats]\npath = \"{}\"\n",
        http_config(listen, admin, origin.addr),
        region.display()
    ));
    assert!(
        supervisor
            .log()
            .contains("the stats region had layout version 1"),
        "{}",
        supervisor.log()
    );
    assert_eq!(client::get(listen, "/new").await.status, 200);
    metrics_after(admin, 1).await;
    let (code, out, err) = baton_stats(&["--path", region.to_str().unwrap(), "--format", "json"]);
    assert_eq!(code, Some(0), "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["region"]["layout_version"], shm_stats::LAYOUT_VERSION);
}

/// The same across `baton upgrade-supervisor`: the supervisor it replaces (here one whose
/// region is made to look like an earlier release's) hands over a region this release cannot
/// write; the upgraded supervisor makes a new one, and the generations started from then on
/// record there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_supervisor_replaces_a_region_an_earlier_release_made() {
    use std::io::{Seek, SeekFrom, Write};

    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let config = format!(
        "{}\n[stats]\npath = \"stats.shm\"\n[supervisor]\ncontrol_socket = \"baton.sock\"\nproxy_binary = \"{}\"\n",
        http_config(listen, admin, origin.addr),
        baton_tests::binaries::proxy().display()
    );
    // A supervisor run from a copy of `baton` beside its config, which the test replaces.
    let baton = std::fs::read(baton_tests::binaries::supervisor()).unwrap();
    let supervisor = Supervisor::start_with(
        &config,
        &[("baton", &baton)],
        &baton_tests::supervisor::Options {
            binary: Some("baton".into()),
            ..Default::default()
        },
    );
    assert_eq!(client::get(listen, "/before").await.status, 200);
    let region = supervisor.dir().join("stats.shm");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&region)
        .unwrap();
    file.seek(SeekFrom::Start(8)).unwrap();
    file.write_all(&1u32.to_ne_bytes()).unwrap();
    drop(file);

    let build = supervisor.status()["supervisor_build"]
        .as_str()
        .unwrap()
        .to_owned();
    let staged = supervisor.dir().join(".baton.new");
    baton_tests::write_executable(&staged, &baton_tests::rebuilt(&baton, &build));
    std::fs::rename(&staged, supervisor.dir().join("baton")).unwrap();
    let out = supervisor.command("upgrade-supervisor", &[]);
    assert_eq!(out.code, Some(0), "{out:?}\n{}", supervisor.log());
    assert!(
        supervisor
            .log()
            .contains("the stats region had layout version 1"),
        "{}",
        supervisor.log()
    );
    let (code, _, err) = baton_stats(&["--path", region.to_str().unwrap()]);
    assert_eq!(code, Some(0), "a new region: {err}");

    // A reload's generation records into the new region.
    assert_eq!(supervisor.reload().code, Some(0));
    assert_eq!(client::get(listen, "/after").await.status, 200);
    metrics_after(admin, 1).await;
    let (code, out, err) =
        baton_stats(&["--path", region.to_str().unwrap(), "^downstream_rq_total"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "downstream_rq_total{listener=public}: 1\n");
}
