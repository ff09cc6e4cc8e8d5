//! The lifecycle's tests: the reloads here, crashes and their replacements in `recovery.rs`,
//! drains and stops in `drain.rs`.

use super::*;

mod drain;
mod recovery;

fn settings() -> Settings {
    Settings {
        readiness_timeout: Duration::from_secs(30),
        drain_timeout: Duration::from_secs(10),
        strategy: DrainStrategy::Gradual,
        max_draining: 2,
        kill_grace: Duration::from_secs(5),
    }
}

/// A lifecycle with generation 0 Active.
fn running(t0: Instant) -> Lifecycle {
    let mut l = Lifecycle::new(settings(), 0);
    assert_eq!(
        l.handle(Event::Reload { waiter: None }, t0),
        [Action::Spawn {
            epoch: 0,
            from: Source::Disk
        }]
    );
    assert_eq!(
        l.handle(Event::Ready { epoch: 0 }, t0),
        [
            Action::Activated {
                epoch: 0,
                replaced: None
            },
            Action::Reply {
                waiters: vec![],
                result: Ok(0)
            }
        ]
    );
    l
}

fn states(l: &Lifecycle) -> Vec<(u64, State)> {
    l.generations().map(|g| (g.epoch, g.state)).collect()
}

#[test]
fn a_reload_drains_the_old_generation_once_the_new_one_is_ready() {
    let t0 = Instant::now();
    let mut l = running(t0);
    assert_eq!(
        l.handle(Event::Reload { waiter: Some(7) }, t0),
        [Action::Spawn {
            epoch: 1,
            from: Source::Disk
        }]
    );
    assert_eq!(states(&l), [(0, State::Active), (1, State::Starting)]);
    assert_eq!(
        l.handle(Event::Ready { epoch: 1 }, t0),
        [
            Action::Drain {
                epoch: 0,
                timeout: Duration::from_secs(10),
                strategy: DrainStrategy::Gradual
            },
            Action::Activated {
                epoch: 1,
                replaced: Some(0)
            },
        ]
    );
    assert_eq!(states(&l), [(0, State::Draining), (1, State::Active)]);
    // The reload is done once the old generation no longer accepts.
    assert_eq!(
        l.handle(Event::StoppedAccepting { epoch: 0 }, t0),
        [Action::Reply {
            waiters: vec![7],
            result: Ok(1)
        }]
    );
    let exited = l.handle(
        Event::Exited {
            epoch: 0,
            status: "exit 0".into(),
        },
        t0,
    );
    assert_eq!(exited, [Action::Retire { epoch: 0 }]);
    assert_eq!(
        l.counts,
        Counts {
            reloads: 1,
            reload_failures: 0,
            crashes: 0
        }
    );
}

#[test]
fn a_reload_ends_without_the_old_generations_word_if_it_is_gone_or_silent() {
    let t0 = Instant::now();
    let mut l = running(t0);
    l.handle(Event::Reload { waiter: Some(1) }, t0);
    l.handle(Event::Ready { epoch: 1 }, t0);
    let gone = l.handle(
        Event::Exited {
            epoch: 0,
            status: "exit 0".into(),
        },
        t0,
    );
    assert!(
        gone.contains(&Action::Reply {
            waiters: vec![1],
            result: Ok(1)
        }),
        "{gone:?}"
    );
    l.handle(Event::Reload { waiter: Some(2) }, t0);
    l.handle(Event::Ready { epoch: 2 }, t0);
    assert_eq!(l.next_deadline(), Some(t0 + HANDOVER_TIMEOUT));
    let silent = l.handle(Event::Tick, t0 + HANDOVER_TIMEOUT);
    assert!(
        silent.contains(&Action::Reply {
            waiters: vec![2],
            result: Ok(2)
        }),
        "{silent:?}"
    );
}

#[test]
fn a_failed_reload_leaves_the_active_generation_alone() {
    let t0 = Instant::now();
    let mut l = running(t0);
    l.handle(Event::Reload { waiter: Some(1) }, t0);
    let reason = "baton.toml:3:1: unknown field `adress`".to_owned();
    assert_eq!(
        l.handle(
            Event::Failed {
                epoch: 1,
                reason: reason.clone()
            },
            t0
        ),
        []
    );
    assert_eq!(
        l.handle(
            Event::Exited {
                epoch: 1,
                status: "exit status 64".into()
            },
            t0
        ),
        [
            Action::Retire { epoch: 1 },
            Action::Reply {
                waiters: vec![1],
                result: Err(reason)
            }
        ]
    );
    assert_eq!(states(&l), [(0, State::Active)]);
    assert_eq!(l.counts.reload_failures, 1);
    // The next reload works.
    assert_eq!(
        l.handle(Event::Reload { waiter: Some(2) }, t0),
        [Action::Spawn {
            epoch: 2,
            from: Source::Disk
        }]
    );
}

#[test]
fn a_generation_that_is_not_ready_in_time_is_killed_and_the_reload_fails() {
    let t0 = Instant::now();
    let mut l = running(t0);
    l.handle(Event::Reload { waiter: Some(1) }, t0);
    assert_eq!(l.next_deadline(), Some(t0 + Duration::from_secs(30)));
    assert_eq!(l.handle(Event::Tick, t0 + Duration::from_secs(29)), []);
    assert_eq!(
        l.handle(Event::Tick, t0 + Duration::from_secs(30)),
        [Action::Kill { epoch: 1 }]
    );
    let actions = l.handle(
        Event::Exited {
            epoch: 1,
            status: "killed by SIGKILL".into(),
        },
        t0 + Duration::from_secs(30),
    );
    let Action::Reply {
        result: Err(reason),
        ..
    } = &actions[1]
    else {
        panic!("{actions:?}")
    };
    assert!(
        reason.contains("not ready within the readiness timeout"),
        "{reason}"
    );
    assert_eq!(l.active(), Some(0));
}

#[test]
fn a_generation_killed_while_starting_does_not_block_the_next_reload() {
    let t0 = Instant::now();
    let mut l = running(t0);
    l.handle(Event::Reload { waiter: None }, t0);
    let actions = l.handle(
        Event::Exited {
            epoch: 1,
            status: "killed by SIGKILL".into(),
        },
        t0,
    );
    assert!(
        matches!(&actions[1], Action::Reply { result: Err(r), .. } if r.contains("exited before it was ready (killed by SIGKILL)"))
    );
    assert_eq!(
        l.handle(Event::Reload { waiter: Some(3) }, t0),
        [Action::Spawn {
            epoch: 2,
            from: Source::Disk
        }]
    );
    l.handle(Event::Ready { epoch: 2 }, t0);
    let ready = l.handle(Event::StoppedAccepting { epoch: 0 }, t0);
    assert!(ready.contains(&Action::Reply {
        waiters: vec![3],
        result: Ok(2)
    }));
}

#[test]
fn reloads_asked_during_a_reload_are_coalesced_into_one_after_it() {
    let t0 = Instant::now();
    let mut l = running(t0);
    l.handle(Event::Reload { waiter: Some(1) }, t0);
    assert_eq!(l.handle(Event::Reload { waiter: Some(2) }, t0), []);
    assert_eq!(l.handle(Event::Reload { waiter: None }, t0), []);
    assert_eq!(l.handle(Event::Reload { waiter: Some(3) }, t0), []);
    l.handle(Event::Ready { epoch: 1 }, t0);
    assert_eq!(
        l.handle(Event::Reload { waiter: Some(4) }, t0),
        [],
        "still in progress until the old one stops accepting"
    );
    let actions = l.handle(Event::StoppedAccepting { epoch: 0 }, t0);
    assert!(actions.contains(&Action::Reply {
        waiters: vec![1],
        result: Ok(1)
    }));
    assert!(
        actions.contains(&Action::Spawn {
            epoch: 2,
            from: Source::Disk
        }),
        "{actions:?}"
    );
    l.handle(Event::Ready { epoch: 2 }, t0);
    let actions = l.handle(Event::StoppedAccepting { epoch: 1 }, t0);
    assert!(
        actions.contains(&Action::Reply {
            waiters: vec![2, 3, 4],
            result: Ok(2)
        }),
        "{actions:?}"
    );
    assert_eq!(
        l.counts.reloads, 2,
        "two reloads; the first start is not one"
    );
}
