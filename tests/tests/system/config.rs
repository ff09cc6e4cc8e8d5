use baton_tests::config::Edit;
use baton_tests::free_addr;
use baton_tests::proxy::{Proxy, run_once};
use baton_tests::tls::TestCa;

/// A valid file to break in one place per case.
const BASE: &str = r#"instance = "test"

[[listener]]
name = "public"
address = "127.0.0.1:18080"
protocol = "http"

[[listener.route]]
path_prefix = "/"
cluster = "origin"

[[cluster]]
name = "origin"
endpoints = ["127.0.0.1:18081"]
"#;

/// `(what is wrong, the file, the line the error must name, words the message must hold)`.
fn cases() -> Vec<(&'static str, String, usize, &'static str)> {
    vec![
        (
            "not TOML",
            BASE.edit("protocol = \"http\"", "protocol = \"http"),
            6,
            "invalid basic string",
        ),
        (
            "a misspelled field",
            BASE.edit("address =", "adress ="),
            5,
            "unknown field `adress` (did you mean `address`?), expected one of",
        ),
        (
            "a misspelt table, whose routes below it would otherwise be the first error",
            BASE.edit("[[listener]]", "[[listner]]"),
            3,
            "unknown field `listner` (did you mean `listener`?), expected one of",
        ),
        (
            "a value of the wrong type",
            BASE.edit("protocol = \"http\"", "protocol = \"http\"\nbacklog = \"many\""),
            7,
            "invalid type: string \"many\", expected i64",
        ),
        (
            "an unknown protocol",
            BASE.edit("protocol = \"http\"", "protocol = \"htp\""),
            6,
            "unknown variant `htp` (did you mean `http`?), expected `http` or `tcp`",
        ),
        (
            "an address without a valid port",
            BASE.edit("127.0.0.1:18080", "127.0.0.1:99999"),
            5,
            "listener.address: `127.0.0.1:99999` is not an IP address and port",
        ),
        (
            "a route to a cluster that does not exist",
            BASE.edit("cluster = \"origin\"", "cluster = \"orgin\""),
            10,
            "listener `public` route 1: cluster `orgin` is not defined (defined clusters: origin)",
        ),
        (
            "two listeners with one name",
            format!("{BASE}\n[[listener]]\nname = \"public\"\naddress = \"127.0.0.1:18082\"\nprotocol = \"tcp\"\ncluster = \"origin\"\n"),
            17,
            "listener `public` is defined twice",
        ),
        (
            "two listeners on one address",
            format!("{BASE}\n[[listener]]\nname = \"other\"\naddress = \"127.0.0.1:18080\"\nprotocol = \"tcp\"\ncluster = \"origin\"\n"),
            18,
            "uses address 127.0.0.1:18080 that listener `public` already uses",
        ),
        (
            "a duration that is not one",
            BASE.edit("endpoints = [", "connect_timeout = \"5 parsecs\"\nendpoints = ["),
            14,
            "cluster.connect_timeout: `5 parsecs` is not a duration",
        ),
        (
            "a TLS certificate file that does not exist",
            BASE.edit(
                "[[listener.route]]",
                "[[listener.tls.certificate]]\ncert = \"missing.pem\"\nkey = \"missing.key\"\n\n[[listener.route]]",
            ),
            8,
            "cannot read certificate file",
        ),
        (
            "a tcp listener without a cluster",
            format!("{BASE}\n[[listener]]\nname = \"l4\"\naddress = \"127.0.0.1:18082\"\nprotocol = \"tcp\"\n"),
            19,
            "listener `l4`: a tcp listener needs `cluster = \"...\"`",
        ),
        (
            "a direct response with an impossible status",
            BASE.edit("cluster = \"origin\"\n\n", "direct_response = { status = 999 }\n\n"),
            10,
            "direct_response.status 999 is not an HTTP status from 200 to 599",
        ),
        (
            "a route with both a cluster and a direct response",
            BASE.edit("cluster = \"origin\"\n\n", "cluster = \"origin\"\ndirect_response = { status = 200 }\n\n"),
            8,
            "give either `cluster`, `weighted_clusters` or `direct_response`, not two of them",
        ),
        (
            "a path prefix without its slash",
            BASE.edit("path_prefix = \"/\"", "path_prefix = \"api\""),
            9,
            "path_prefix `api` must start with `/`",
        ),
        (
            "a cluster with no endpoints",
            BASE.edit("endpoints = [\"127.0.0.1:18081\"]", "endpoints = []"),
            14,
            "cluster `origin`: endpoints is empty",
        ),
        (
            "a duration of the wrong type (the line is quoted)",
            BASE.edit("endpoints = [", "request_timeout = true\nendpoints = ["),
            14,
            "expected a duration such as \"5s\" or \"250ms\", or a number of seconds (in `request_timeout = true`)",
        ),
        (
            "an endpoint without a port",
            BASE.edit("127.0.0.1:18081", "127.0.0.1"),
            14,
            "endpoint `127.0.0.1` has no port",
        ),
        (
            "a wildcard listener overlapping another",
            format!("{BASE}\n[[listener]]\nname = \"all\"\naddress = \"0.0.0.0:18080\"\nprotocol = \"tcp\"\ncluster = \"origin\"\n"),
            18,
            "listener `all` on 0.0.0.0:18080 overlaps listener `public` on 127.0.0.1:18080",
        ),
        (
            "an access log in a folder that does not exist",
            BASE.edit("protocol = \"http\"", "protocol = \"http\"\naccess_log = \"nodir/access.log\""),
            7,
            "access_log folder",
        ),
        (
            "no listener at all",
            "instance = \"test\"\n".to_owned(),
            1,
            "no listener is configured",
        ),
        (
            "an unknown balancer",
            BASE.edit("endpoints = [", "lb_policy = \"fastest\"\nendpoints = ["),
            14,
            "unknown variant `fastest`, expected one of `round_robin`, `least_request`, `random`, `ring_hash`, `maglev`",
        ),
        (
            "ring hash without a key",
            BASE.edit("endpoints = [", "lb_policy = \"ring_hash\"\nendpoints = ["),
            14,
            "cluster `origin`: lb_policy `ring_hash` needs a hash_key",
        ),
        (
            "a bad endpoint weight",
            BASE.edit("127.0.0.1:18081", "127.0.0.1:18081 weight=0"),
            14,
            "the weight must be a whole number from 1 to 10000, not `0`",
        ),
        (
            "a DNS setting on a static cluster",
            BASE.edit("endpoints = [", "dns_refresh_rate = \"1s\"\nendpoints = ["),
            14,
            "`dns_refresh_rate` applies to `discovery = \"strict_dns\"` clusters only",
        ),
        (
            "an unknown retry condition",
            BASE.edit(
                "cluster = \"origin\"",
                "cluster = \"origin\"\nretry = { retry_on = [\"timeout\"] }",
            ),
            11,
            "`timeout` is not one of \"connect-failure\", \"reset\", \"5xx\", \"gateway-error\"",
        ),
        (
            "a retry condition written with an underscore",
            BASE.edit(
                "cluster = \"origin\"",
                "cluster = \"origin\"\nretry = { retry_on = [\"connect_failure\"] }",
            ),
            11,
            "`connect_failure` (did you mean \"connect-failure\"?) is not one of",
        ),
        (
            "a header match with two rules",
            BASE.edit(
                "cluster = \"origin\"",
                "cluster = \"origin\"\nheaders = [{ name = \"x-a\", exact = \"1\", prefix = \"2\" }]",
            ),
            11,
            "a header match takes `name` and exactly one of exact, prefix, regex, present",
        ),
        (
            "an outlier detection with every detector off",
            BASE.edit(
                "endpoints = [",
                "outlier_detection = { consecutive_5xx = 0 }\nendpoints = [",
            ),
            14,
            "outlier_detection has every detector off",
        ),
        (
            "an escaped-slash action that does not exist",
            BASE.edit(
                "protocol = \"http\"",
                "protocol = \"http\"\npath_with_escaped_slashes = \"decode\"",
            ),
            7,
            "unknown variant `decode`, expected one of `keep`, `reject`, `unescape_and_forward`, `unescape_and_redirect`",
        ),
        (
            "path normalisation on a tcp listener",
            format!("{BASE}\n[[listener]]\nname = \"raw\"\naddress = \"127.0.0.1:18082\"\nprotocol = \"tcp\"\ncluster = \"origin\"\nmerge_slashes = false\n"),
            21,
            "listener `raw`: `merge_slashes` applies to http listeners only",
        ),
        (
            "a health check status range upside down",
            BASE.edit(
                "endpoints = [",
                "health_check = { type = \"http\", expected_statuses = [\"399-200\"] }\nendpoints = [",
            ),
            14,
            "expected a status from 100 to 599 such as 200, or a range such as \"200-399\"",
        ),
        (
            "h2c among a route's upgrades",
            BASE.edit(
                "cluster = \"origin\"",
                "cluster = \"origin\"\nupgrades = [\"websocket\", \"h2c\"]",
            ),
            11,
            "upgrades: `h2c` cannot be allowed: a client's `Upgrade: h2c` is always ignored",
        ),
        (
            "an upgrade protocol that is not a token",
            BASE.edit(
                "cluster = \"origin\"",
                "cluster = \"origin\"\nupgrades = [\"web socket\"]",
            ),
            11,
            "upgrades: `web socket` is not a protocol name",
        ),
        (
            "upgrades on a direct response",
            BASE.edit(
                "cluster = \"origin\"\n\n",
                "direct_response = { status = 200 }\nupgrade_idle_timeout = \"1h\"\n\n",
            ),
            11,
            "`upgrade_idle_timeout` applies to routes to a cluster",
        ),
    ]
}

#[test]
fn every_bad_config_is_refused_with_its_line_and_reason() {
    let mut failures = Vec::new();
    for (what, config, line, words) in cases() {
        let output = run_once(&config, true);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let at = format!("baton.toml:{line}:");
        if output.status.code() != Some(1) || !stderr.contains(&at) || !stderr.contains(words) {
            failures.push(format!(
                "{what}: expected exit 1 and `{at}` and `{words}`, got {:?}: {stderr}",
                output.status.code()
            ));
        }
        assert!(
            stderr.lines().count() <= 2,
            "{what}: the error is short: {stderr}"
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_key_that_does_not_match_its_certificate_is_refused() {
    let ca = TestCa::new();
    let (one, two) = (ca.leaf(&["a.test"]), ca.leaf(&["a.test"]));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.pem"), &one.cert_pem).unwrap();
    std::fs::write(dir.path().join("b.key"), &two.key_pem).unwrap();
    let config = BASE.edit(
        "[[listener.route]]",
        &format!(
            "[[listener.tls.certificate]]\ncert = \"{}\"\nkey = \"{}\"\n\n[[listener.route]]",
            dir.path().join("a.pem").display(),
            dir.path().join("b.key").display()
        ),
    );
    let output = run_once(&config, true);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.contains("baton.toml:8:"), "{stderr}");
    assert!(
        stderr.contains("does not belong to certificate"),
        "{stderr}"
    );
}

#[test]
fn a_valid_config_passes_the_check_and_a_bad_one_stops_the_start() {
    let output = run_once(BASE, true);
    assert_eq!(output.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&output.stdout).contains("baton.toml is valid"));

    let output = run_once(&BASE.edit("address =", "adress ="), false);
    assert_eq!(
        output.status.code(),
        Some(64),
        "a bad config at start is a usage error"
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown field `adress`"));
}

#[test]
fn a_taken_port_is_named_with_the_way_out() {
    let taken = std::net::TcpListener::bind(free_addr()).unwrap();
    let addr = taken.local_addr().unwrap();
    let config = BASE.edit("127.0.0.1:18080", &addr.to_string());
    let log = match Proxy::start_with(&config, &[]) {
        Ok(_) => panic!("the proxy started on a taken port"),
        Err(log) => log,
    };
    assert!(
        log.contains(&format!("listener `public`: cannot listen on {addr}")),
        "{log}"
    );
    assert!(
        log.contains("another process is listening on this address"),
        "{log}"
    );
}

#[test]
fn the_example_config_is_valid() {
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart.toml");
    let output = run_once(&std::fs::read_to_string(example).unwrap(), true);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
