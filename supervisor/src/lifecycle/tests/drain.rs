//! Drains (on a reload, `baton drain`, `max_draining`) and stops.

use super::*;

#[test]
fn too_many_draining_generations_hurry_the_oldest() {
    let t0 = Instant::now();
    let mut l = running(t0);
    for epoch in 1..=3u64 {
        let t = t0 + Duration::from_millis(epoch * 10);
        l.handle(Event::Reload { waiter: None }, t);
        let actions = l.handle(Event::Ready { epoch }, t);
        l.handle(Event::StoppedAccepting { epoch: epoch - 1 }, t);
        if epoch == 3 {
            assert!(
                // Its drain's own deadline, not a shorter one: answers in flight finish.
                actions.contains(&Action::Drain {
                    epoch: 0,
                    timeout: Duration::from_secs(10) - Duration::from_millis(20),
                    strategy: DrainStrategy::Immediate
                }),
                "{actions:?}"
            );
        }
    }
    assert_eq!(
        l.draining(),
        3,
        "hurried, not killed: it still finishes its requests"
    );
}

#[test]
fn a_graceful_stop_drains_everything_then_exits() {
    let t0 = Instant::now();
    let mut l = running(t0);
    l.handle(Event::Reload { waiter: Some(5) }, t0);
    let actions = l.handle(Event::Stop { graceful: true }, t0);
    assert!(actions.contains(&Action::Reply {
        waiters: vec![5],
        result: Err("the supervisor is stopping".into())
    }));
    assert!(actions.contains(&Action::Drain {
        epoch: 0,
        timeout: Duration::from_secs(10),
        strategy: DrainStrategy::Immediate
    }));
    assert!(
        actions.contains(&Action::Stop { epoch: 1 }),
        "a starting generation is just stopped"
    );
    assert_eq!(
        l.handle(Event::Reload { waiter: Some(6) }, t0),
        [Action::Reply {
            waiters: vec![6],
            result: Err("the supervisor is stopping".into())
        }]
    );
    assert_eq!(
        l.handle(
            Event::Exited {
                epoch: 1,
                status: "exit 0".into()
            },
            t0
        )[0],
        Action::Retire { epoch: 1 }
    );
    let actions = l.handle(
        Event::Exited {
            epoch: 0,
            status: "exit 0".into(),
        },
        t0,
    );
    assert_eq!(
        actions,
        [Action::Retire { epoch: 0 }, Action::Exit { code: 0 }]
    );
    assert_eq!(
        l.counts.crashes, 0,
        "generations leaving at a stop are no crash"
    );
}

#[test]
fn a_generation_that_outlives_its_drain_is_killed() {
    let t0 = Instant::now();
    let mut l = running(t0);
    l.handle(Event::Stop { graceful: false }, t0);
    assert_eq!(
        l.handle(Event::Tick, t0 + Duration::from_secs(5)),
        [Action::Kill { epoch: 0 }]
    );
    let mut l = running(t0);
    l.handle(Event::Reload { waiter: None }, t0);
    l.handle(Event::Ready { epoch: 1 }, t0);
    l.handle(Event::StoppedAccepting { epoch: 0 }, t0);
    assert_eq!(l.handle(Event::Tick, t0 + Duration::from_secs(14)), []);
    assert_eq!(
        l.handle(Event::Tick, t0 + Duration::from_secs(15)),
        [Action::Kill { epoch: 0 }]
    );
}

#[test]
fn a_drain_lasts_until_the_next_reload() {
    let t0 = Instant::now();
    let mut l = running(t0);
    assert_eq!(
        l.handle(Event::Drain { waiter: Some(7) }, t0),
        [Action::Drain {
            epoch: 0,
            timeout: Duration::from_secs(10),
            strategy: DrainStrategy::Gradual
        }]
    );
    assert!(l.drained());
    assert_eq!(
        l.handle(Event::StoppedAccepting { epoch: 0 }, t0),
        [Action::DrainReply {
            waiters: vec![7],
            result: Ok(Some(0))
        }],
        "`baton drain` returns once the generation no longer accepts"
    );
    let later = t0 + Duration::from_secs(1);
    assert_eq!(
        l.handle(
            Event::Exited {
                epoch: 0,
                status: "exit 0".into()
            },
            later
        ),
        [Action::Retire { epoch: 0 }],
        "a drained generation leaving is no crash, and nothing replaces it"
    );
    assert_eq!(l.counts.crashes, 0);
    assert_eq!(l.next_deadline(), None);
    assert!(
        l.handle(Event::Tick, t0 + Duration::from_secs(120))
            .is_empty()
    );
    assert_eq!(
        l.handle(Event::Drain { waiter: Some(8) }, later),
        [Action::DrainReply {
            waiters: vec![8],
            result: Ok(None)
        }],
        "draining again while drained is no error"
    );

    assert_eq!(
        l.handle(Event::Reload { waiter: Some(9) }, later),
        [Action::Spawn {
            epoch: 1,
            from: Source::Disk
        }]
    );
    assert_eq!(
        l.handle(Event::Ready { epoch: 1 }, later),
        [
            Action::Activated {
                epoch: 1,
                replaced: None
            },
            Action::Reply {
                waiters: vec![9],
                result: Ok(1)
            }
        ]
    );
    assert!(!l.drained());
    assert_eq!(l.active(), Some(1));
}

#[test]
fn a_drain_is_refused_while_a_generation_starts() {
    let t0 = Instant::now();
    let mut l = running(t0);
    l.handle(Event::Reload { waiter: None }, t0);
    let actions = l.handle(Event::Drain { waiter: Some(3) }, t0);
    let [
        Action::DrainReply {
            waiters,
            result: Err(reason),
        },
    ] = &actions[..]
    else {
        panic!("refused: {actions:?}");
    };
    assert_eq!(waiters, &[3]);
    assert!(reason.contains("generation 1 is starting"), "{reason}");
    assert!(!l.drained());
    assert_eq!(l.active(), Some(0), "the active generation is untouched");
}

#[test]
fn a_drain_answers_at_the_handover_deadline_if_the_generation_stays_silent() {
    let t0 = Instant::now();
    let mut l = running(t0);
    l.handle(Event::Drain { waiter: Some(4) }, t0);
    let actions = l.handle(Event::Tick, t0 + HANDOVER_TIMEOUT);
    assert!(actions.contains(&Action::DrainReply {
        waiters: vec![4],
        result: Ok(Some(0))
    }));
}
