//! The Grafana dashboard shipped in `contrib/grafana/baton.json` asks only for metrics that a
//! running baton exposes: a renamed stat must not leave a panel silently empty.

use std::collections::BTreeSet;
use std::path::Path;

use baton_tests::client;
use baton_tests::free_addr;
use baton_tests::supervisor::Supervisor;
use baton_tests::upstream::Origin;
use promql_parser::label::MatchOp;
use promql_parser::parser::{Expr, VectorSelector};
use promql_parser::util::{ExprVisitor, walk_expr};

use crate::stats::check_exposition;
use crate::{WAIT, http_config};

/// The metric names a dashboard's PromQL expression selects, read by a PromQL parser (so a
/// syntax error fails the test too). Grafana's `$__rate_interval` becomes a plain range, and
/// its `label_values(SELECTOR, LABEL)` counts as `SELECTOR`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let expr = expr.replace("$__rate_interval", "5m");
    let expr = match expr.trim().strip_prefix("label_values(") {
        Some(rest) => rest
            .strip_suffix(')')
            .and_then(|r| r.rsplit_once(','))
            .map_or(rest, |(selector, _label)| selector)
            .to_owned(),
        None => expr,
    };
    let parsed = promql_parser::parser::parse(&expr)
        .unwrap_or_else(|e| panic!("the dashboard's `{expr}` is not PromQL: {e}"));
    struct Names(BTreeSet<String>);
    impl Names {
        fn add(&mut self, selector: &VectorSelector) {
            let name = selector.name.clone().or_else(|| {
                let m = selector
                    .matchers
                    .matchers
                    .iter()
                    .find(|m| m.name == "__name__")?;
                (m.op == MatchOp::Equal).then(|| m.value.clone())
            });
            self.0.insert(name.unwrap_or_else(|| {
                panic!("the dashboard selects by a name pattern ({selector}): name each metric")
            }));
        }
    }
    impl ExprVisitor for Names {
        type Error = std::convert::Infallible;
        fn pre_visit(&mut self, expr: &Expr) -> Result<bool, Self::Error> {
            match expr {
                Expr::VectorSelector(vs) => self.add(vs),
                Expr::MatrixSelector(ms) => self.add(&ms.vs),
                _ => {}
            }
            Ok(true)
        }
    }
    let mut names = Names(BTreeSet::new());
    let Ok(_) = walk_expr(&mut names, &parsed);
    names.0
}

/// Every PromQL expression of a dashboard: panel targets and annotations (`expr`), and the
/// queries of template variables.
fn expressions(doc: &serde_json::Value, out: &mut Vec<String>) {
    match doc {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => expressions(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| expressions(i, out)),
        _ => {}
    }
}

fn variable_queries(doc: &serde_json::Value) -> Vec<String> {
    doc["templating"]["list"]
        .as_array()
        .expect("the dashboard has template variables")
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| match &v["query"] {
            serde_json::Value::String(q) => q.clone(),
            q => q["query"].as_str().expect("a variable's query").to_owned(),
        })
        .collect()
}

#[test]
fn the_name_extraction_finds_every_metric_and_nothing_else() {
    let got = metric_names(
        r#"sum by (le, cluster) (rate(baton_nope_bucket{a="b,c}", le!="1"}[$__rate_interval])) / clamp_min(sum(baton_x_2xx offset 5m), 1e-9) > bool 0 and on(instance) {__name__="baton_y"}"#,
    );
    let want: BTreeSet<String> = ["baton_nope_bucket", "baton_x_2xx", "baton_y"]
        .map(String::from)
        .into();
    assert_eq!(got, want);
    assert_eq!(
        metric_names(r#"label_values(baton_server_live{instance=~"$instance"}, listener)"#),
        ["baton_server_live".to_owned()].into()
    );
    assert_eq!(
        metric_names("changes(max(baton_server_epoch)[2m:15s]) > 0"),
        ["baton_server_epoch".to_owned()].into()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_grafana_dashboard_queries_is_in_the_exposition() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/grafana/baton.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    expressions(&doc, &mut exprs);
    exprs.extend(variable_queries(&doc));
    assert!(exprs.len() > 20, "{exprs:?}");
    let wanted: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    // What the README promises the dashboard shows.
    for name in [
        "baton_downstream_rq_total",
        "baton_downstream_rq_5xx",
        "baton_downstream_rq_time_seconds_bucket",
        "baton_supervisor_reloads_total",
        "baton_supervisor_generations_draining",
        "baton_upstream_cx_connect_fail",
        "baton_membership_healthy",
    ] {
        assert!(wanted.contains(name), "the dashboard does not show {name}");
    }

    // A supervised baton that has answered requests and been reloaded once.
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let supervisor = Supervisor::start(&http_config(listen, admin, origin.addr));
    for i in 0..3 {
        assert_eq!(client::get(listen, &format!("/d{i}")).await.status, 200);
    }
    let reload = supervisor.reload();
    assert_eq!(reload.code, Some(0), "{}", reload.stderr);
    assert_eq!(client::get(listen, "/after").await.status, 200);
    let served = baton_tests::wait_until_async(WAIT, || async {
        client::get(admin, "/metrics")
            .await
            .text()
            .contains("baton_supervisor_reloads_total 1\n")
    })
    .await;
    assert!(served, "{}", client::get(admin, "/metrics").await.text());

    let exposed: BTreeSet<String> = check_exposition(&client::get(admin, "/metrics").await.text())
        .into_keys()
        .map(|series| series.split('{').next().unwrap().to_owned())
        .collect();
    let missing: Vec<_> = wanted.difference(&exposed).collect();
    assert!(
        missing.is_empty(),
        "{} queries metrics that /metrics does not expose: {missing:?}",
        path.display()
    );
}
