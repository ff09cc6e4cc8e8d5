use baton_tests::binaries;
use baton_tests::client;
use baton_tests::free_addr;
use baton_tests::supervisor::Supervisor;
use baton_tests::upstream::Origin;

use crate::http_config;

/// `NAME --version` of a real binary, split into its name, version and build id; asserts the
/// form `NAME VERSION (build ID)` on one line.
fn version_of(binary: &std::path::Path) -> (String, String, String) {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .expect("the binary runs");
    assert!(out.status.success(), "{}: {out:?}", binary.display());
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let line = text.strip_suffix('\n').unwrap_or(&text);
    assert!(!line.contains('\n'), "one line: {text:?}");
    let parse = || {
        let (name, rest) = line.split_once(' ')?;
        let (version, rest) = rest.split_once(" (build ")?;
        let id = rest.strip_suffix(')')?;
        Some((name.to_owned(), version.to_owned(), id.to_owned()))
    };
    let (name, version, id) =
        parse().unwrap_or_else(|| panic!("`NAME VERSION (build ID)`, not {line:?}"));
    assert_eq!(version, env!("CARGO_PKG_VERSION"), "{line}");
    assert!(
        id.len() > 8 && !id.contains(char::is_whitespace),
        "a build id: {line}"
    );
    (name, version, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_binary_names_its_build_as_the_running_service_reports_it() {
    let (baton, _, baton_build) = version_of(binaries::supervisor());
    let (proxy, _, proxy_build) = version_of(binaries::proxy());
    let (stats, _, stats_build) = version_of(binaries::stats());
    assert_eq!(
        [baton.as_str(), proxy.as_str(), stats.as_str()],
        ["baton", "baton-proxy", "baton-stats"]
    );

    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let supervisor = Supervisor::start(&http_config(listen, admin, origin.addr));
    let status = supervisor.status();
    assert_eq!(status["supervisor_build"], baton_build.as_str(), "{status}");
    assert_eq!(
        status["generations"][0]["build"],
        proxy_build.as_str(),
        "{status}"
    );
    let info = client::get(admin, "/server_info").await.json();
    assert_eq!(info["build_id"], proxy_build.as_str(), "{info}");
    // One build of the workspace gives its three binaries one id (it hashes their sources).
    assert_eq!(stats_build, proxy_build);
    assert_eq!(baton_build, proxy_build);
}
