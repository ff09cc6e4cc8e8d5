use super::*;
use crate::config::{Discovery, OutlierDetection};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::lb::Policy;

fn cluster(panic_threshold: f64) -> Cluster {
    let config = crate::config::parse(
        std::path::Path::new("t.toml"),
        "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:1\"\nprotocol = \"http\"\nroute = [{ cluster = \"c\" }]\n[[cluster]]\nname = \"c\"\nendpoints = [\"127.0.0.1:2\"]\n",
    )
    .expect("a valid config");
    let mut c = config.clusters.into_iter().next().unwrap();
    c.panic_threshold = panic_threshold;
    assert!(matches!(c.discovery, Discovery::Static));
    c
}

fn hosts(healthy: &[bool]) -> Vec<(Arc<Host>, HealthFlags)> {
    healthy
        .iter()
        .enumerate()
        .map(|(i, &ok)| {
            let host = Arc::new(Host::new(SocketAddr::from(([10, 0, 0, i as u8], 80)), 1));
            let flags = HealthFlags {
                failed_active_hc: !ok,
                ..HealthFlags::default()
            };
            (host, flags)
        })
        .collect()
}

#[test]
fn too_few_healthy_hosts_mean_panic_mode_over_all_of_them() {
    let s = Snapshot::build(&cluster(50.0), 1, hosts(&[true, false, false]));
    assert!(s.panic);
    assert_eq!(s.targets.len(), 3);
    let s = Snapshot::build(&cluster(50.0), 1, hosts(&[true, true, false]));
    assert!(!s.panic);
    assert_eq!(s.targets.len(), 2);
    assert!(
        s.targets
            .iter()
            .all(|h| h.address.ip().to_string() != "10.0.0.2")
    );
    // Panic mode off: no healthy host, no target.
    let s = Snapshot::build(&cluster(0.0), 1, hosts(&[false, false]));
    assert!(!s.panic);
    assert!(s.targets.is_empty());
}

#[test]
fn a_retry_goes_to_another_host_whenever_there_is_one() {
    let (tx, _rx) = mpsc::unbounded_channel();
    for policy in [Policy::RoundRobin, Policy::Random, Policy::LeastRequest] {
        let mut c = cluster(50.0);
        c.lb_policy = policy;
        let s = Snapshot::build(&c, 1, hosts(&[true, true]));
        let first = s.targets[0].address;
        let handle = ClusterHandle::new(0, s, tx.clone());
        let state = WorkerLb::default();
        for _ in 0..500 {
            let pick = handle.pick(policy, &state, None, &[first]).unwrap();
            assert_ne!(pick.host.address, first, "{policy:?}");
        }
    }
}

/// A least-request cluster over hosts of `weights`, all healthy.
fn least_request(weights: &[u32]) -> (ClusterHandle, Vec<Arc<Host>>) {
    let mut c = cluster(50.0);
    c.lb_policy = Policy::LeastRequest;
    let hosts: Vec<(Arc<Host>, HealthFlags)> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            let address = SocketAddr::from(([10, 0, 0, i as u8], 80));
            (Arc::new(Host::new(address, w)), HealthFlags::default())
        })
        .collect();
    let s = Snapshot::build(&c, 1, hosts);
    let targets = s.targets.clone();
    let (tx, _rx) = mpsc::unbounded_channel();
    (ClusterHandle::new(0, s, tx), targets)
}

/// How many of `n` picks went to each of `hosts`.
fn spread(handle: &ClusterHandle, hosts: &[Arc<Host>], n: usize) -> Vec<usize> {
    let state = WorkerLb::default();
    let mut counts = vec![0; hosts.len()];
    for _ in 0..n {
        let pick = handle
            .pick(Policy::LeastRequest, &state, None, &[])
            .unwrap();
        counts[hosts
            .iter()
            .position(|h| h.address == pick.host.address)
            .unwrap()] += 1;
    }
    counts
}

#[test]
fn least_request_with_unequal_weights_follows_them_and_moves_off_a_loaded_host() {
    // Nothing in flight: the weights' shares, exactly (the heavier used to take them all).
    let (handle, hosts) = least_request(&[2, 1]);
    assert_eq!(spread(&handle, &hosts, 600), [400, 200]);
    let (handle, hosts) = least_request(&[1, 3, 1]);
    assert_eq!(spread(&handle, &hosts, 500), [100, 300, 100]);
    // The heavier with 3 in flight weighs 2/4 against 1: a third of the picks, not two.
    let (handle, hosts) = least_request(&[2, 1]);
    hosts[0].rq_active.store(3, Ordering::Relaxed);
    assert_eq!(spread(&handle, &hosts, 600), [200, 400]);
}

#[test]
fn least_request_with_equal_weights_takes_the_less_busy_of_two() {
    let (handle, hosts) = least_request(&[3, 3]);
    let got = spread(&handle, &hosts, 3000);
    // Binomial(3000, 1/2): a standard deviation of 27; 300 is eleven of them.
    assert!(got.iter().all(|&c| (1200..1800).contains(&c)), "{got:?}");
    hosts[1].rq_active.store(1, Ordering::Relaxed);
    assert_eq!(spread(&handle, &hosts, 100), [100, 0]);
}

#[test]
fn a_least_request_retry_with_unequal_weights_goes_elsewhere() {
    let (handle, hosts) = least_request(&[5, 1]);
    let state = WorkerLb::default();
    for _ in 0..100 {
        let pick = handle
            .pick(Policy::LeastRequest, &state, None, &[hosts[0].address])
            .unwrap();
        assert_eq!(pick.host.address, hosts[1].address);
    }
    // Every host tried: one is still chosen.
    let all = [hosts[0].address, hosts[1].address];
    assert!(
        handle
            .pick(Policy::LeastRequest, &state, None, &all)
            .is_some()
    );
}

#[test]
fn a_run_of_failures_tells_the_manager_once_and_a_success_ends_it() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let s = Snapshot::build(&cluster(50.0), 1, hosts(&[true]));
    let host = s.targets[0].clone();
    let handle = ClusterHandle::new(0, s, tx);
    let outlier = OutlierDetection {
        consecutive_5xx: Some(3),
        consecutive_gateway_failure: Some(2),
        base_ejection_time: Duration::from_secs(1),
        max_ejection_time: Duration::from_secs(10),
        max_ejection_percent: 10.0,
    };
    handle.report(&host, Outcome::Status(500), Some(&outlier));
    handle.report(&host, Outcome::Status(500), Some(&outlier));
    assert!(rx.try_recv().is_err(), "two 500s are not three");
    handle.report(&host, Outcome::Status(200), Some(&outlier));
    handle.report(&host, Outcome::Status(500), Some(&outlier));
    handle.report(&host, Outcome::Status(500), Some(&outlier));
    assert!(rx.try_recv().is_err(), "a success started the count again");
    handle.report(&host, Outcome::Status(500), Some(&outlier));
    assert!(matches!(rx.try_recv(), Ok(Event::Outlier { .. })));
    handle.report(&host, Outcome::Status(500), Some(&outlier));
    assert!(rx.try_recv().is_err(), "one event per run");
    // Gateway failures: connect failures count.
    handle.report(&host, Outcome::Status(200), Some(&outlier));
    handle.report(&host, Outcome::LocalFailure, Some(&outlier));
    handle.report(&host, Outcome::Status(503), Some(&outlier));
    assert!(matches!(rx.try_recv(), Ok(Event::Outlier { .. })));
    assert_eq!(host.rq_error.load(Ordering::Relaxed), 8);
}
