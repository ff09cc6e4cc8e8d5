//! A crashed active generation and its replacements.

use super::*;

fn crash(l: &mut Lifecycle, epoch: u64, t: Instant) -> Vec<Action> {
    l.handle(
        Event::Exited {
            epoch,
            status: "killed by signal 9 (SIGKILL)".into(),
        },
        t,
    )
}

fn replacement(epoch: u64) -> Action {
    Action::Spawn {
        epoch,
        from: Source::LastGood,
    }
}

#[test]
fn a_crashed_generation_that_served_is_replaced_at_once_from_the_last_good_launch() {
    let t0 = Instant::now();
    let mut l = running(t0);
    // Served for five seconds, then crashed, eight times over: each replacement comes
    // 100 ms after the crash, never later.
    let mut t = t0 + Duration::from_secs(5);
    for epoch in 0..8u64 {
        assert_eq!(crash(&mut l, epoch, t), [Action::Retire { epoch }]);
        assert_eq!(l.next_deadline(), Some(t + Duration::from_millis(100)));
        t += Duration::from_millis(100);
        assert_eq!(l.handle(Event::Tick, t), [replacement(epoch + 1)]);
        assert!(
            l.handle(Event::Ready { epoch: epoch + 1 }, t)
                .contains(&Action::Activated {
                    epoch: epoch + 1,
                    replaced: None
                })
        );
        t += Duration::from_secs(5);
    }
    assert_eq!(l.counts.crashes, 8);
}

#[test]
fn replacements_that_fail_or_crash_at_once_wait_longer_each_time_up_to_five_seconds() {
    let t0 = Instant::now();
    let mut l = running(t0);
    let mut t = t0 + Duration::from_secs(5);
    crash(&mut l, 0, t);
    // Replacements that fail before they are ready: 100 ms, doubling to 5 s.
    let mut delay = Duration::from_millis(100);
    for epoch in 1..10u64 {
        assert_eq!(
            l.next_deadline(),
            Some(t + delay),
            "before replacement {epoch}"
        );
        t += delay;
        assert_eq!(l.handle(Event::Tick, t), [replacement(epoch)]);
        l.handle(
            Event::Exited {
                epoch,
                status: "exit status 1".into(),
            },
            t,
        );
        delay = (delay * 2).min(Duration::from_secs(5));
    }
    assert_eq!(delay, Duration::from_secs(5));
    // One that becomes active and crashes within its first second is replaced within a
    // second, however long the delay had grown.
    t += delay;
    assert_eq!(l.handle(Event::Tick, t), [replacement(10)]);
    l.handle(Event::Ready { epoch: 10 }, t);
    crash(&mut l, 10, t + Duration::from_millis(10));
    assert_eq!(
        l.next_deadline(),
        Some(t + Duration::from_millis(10) + Duration::from_secs(1))
    );
}

#[test]
fn generations_that_crash_right_after_they_became_active_are_replaced_within_a_second() {
    let t0 = Instant::now();
    let mut l = running(t0);
    let mut t = t0 + Duration::from_secs(5);
    crash(&mut l, 0, t);
    let mut delay = Duration::from_millis(100);
    for epoch in 1..8u64 {
        assert_eq!(
            l.next_deadline(),
            Some(t + delay),
            "before replacement {epoch}"
        );
        t += delay;
        assert_eq!(l.handle(Event::Tick, t), [replacement(epoch)]);
        l.handle(Event::Ready { epoch }, t);
        t += Duration::from_millis(10);
        crash(&mut l, epoch, t);
        delay = (delay * 2).min(Duration::from_secs(1));
    }
    assert_eq!(delay, Duration::from_secs(1));
}

#[test]
fn a_failed_reload_never_cancels_the_replacement_of_a_crashed_generation() {
    let t0 = Instant::now();
    let mut l = running(t0);
    let t1 = t0 + Duration::from_secs(5);
    crash(&mut l, 0, t1);
    // A reload comes while the replacement waits out its delay; its config is broken.
    assert_eq!(
        l.handle(Event::Reload { waiter: Some(7) }, t1),
        [Action::Spawn {
            epoch: 1,
            from: Source::Disk
        }]
    );
    let actions = l.handle(
        Event::Exited {
            epoch: 1,
            status: "exit status 64".into(),
        },
        t1 + Duration::from_millis(50),
    );
    let reply = actions
        .iter()
        .find_map(|a| match a {
            Action::Reply { waiters, result } if waiters == &[7] => Some(result.clone()),
            _ => None,
        })
        .expect("the reload is answered");
    let reason = reply.unwrap_err();
    assert!(reason.contains("no generation is active"), "{reason}");
    // The replacement from the last good launch still comes.
    assert_eq!(
        l.handle(Event::Tick, t1 + Duration::from_millis(100)),
        [replacement(2)]
    );
    assert!(
        l.handle(Event::Ready { epoch: 2 }, t1 + Duration::from_millis(150))
            .contains(&Action::Activated {
                epoch: 2,
                replaced: None
            })
    );
    assert_eq!(l.active(), Some(2));
}

#[test]
fn a_crash_during_a_reload_is_replaced_even_if_the_reload_fails() {
    let t0 = Instant::now();
    let mut l = running(t0);
    let t1 = t0 + Duration::from_secs(5);
    l.handle(Event::Reload { waiter: None }, t1);
    crash(&mut l, 0, t1);
    // The replacement starts beside the reload's generation.
    assert_eq!(
        l.handle(Event::Tick, t1 + Duration::from_millis(100)),
        [replacement(2)]
    );
    l.handle(
        Event::Exited {
            epoch: 1,
            status: "exit status 64".into(),
        },
        t1 + Duration::from_millis(150),
    );
    l.handle(Event::Ready { epoch: 2 }, t1 + Duration::from_millis(200));
    assert_eq!(l.active(), Some(2));
}

#[test]
fn a_replacement_gives_way_to_a_reload_that_is_ready_first() {
    let t0 = Instant::now();
    let mut l = running(t0);
    let t1 = t0 + Duration::from_secs(5);
    crash(&mut l, 0, t1);
    l.handle(Event::Reload { waiter: Some(1) }, t1);
    assert_eq!(
        l.handle(Event::Tick, t1 + Duration::from_millis(100)),
        [replacement(2)]
    );
    // The reload's generation (new config) is ready first: the replacement (old config) is
    // stopped, not made active over it.
    let actions = l.handle(Event::Ready { epoch: 1 }, t1 + Duration::from_millis(150));
    assert!(actions.contains(&Action::Stop { epoch: 2 }), "{actions:?}");
    assert!(
        actions.contains(&Action::Reply {
            waiters: vec![1],
            result: Ok(1)
        }),
        "{actions:?}"
    );
    assert!(l.handle(Event::Ready { epoch: 2 }, t1).is_empty());
    assert_eq!(l.active(), Some(1));
    // And a reload ready after a replacement replaces it as any reload does.
    let mut l = running(t0);
    crash(&mut l, 0, t1);
    l.handle(Event::Reload { waiter: None }, t1);
    l.handle(Event::Tick, t1 + Duration::from_millis(100));
    l.handle(Event::Ready { epoch: 2 }, t1 + Duration::from_millis(150));
    let actions = l.handle(Event::Ready { epoch: 1 }, t1 + Duration::from_millis(200));
    assert!(
        actions.contains(&Action::Activated {
            epoch: 1,
            replaced: Some(2)
        }),
        "{actions:?}"
    );
}

#[test]
fn no_replacement_while_drained_on_purpose() {
    let t0 = Instant::now();
    let mut l = running(t0);
    l.handle(Event::Drain { waiter: None }, t0);
    crash(&mut l, 0, t0);
    assert_eq!(l.next_deadline(), None);
}

#[test]
fn the_first_generation_failing_ends_the_supervisor() {
    let t0 = Instant::now();
    let mut l = Lifecycle::new(settings(), 0);
    l.handle(Event::Reload { waiter: None }, t0);
    l.handle(
        Event::Failed {
            epoch: 0,
            reason: "port in use".into(),
        },
        t0,
    );
    let actions = l.handle(
        Event::Exited {
            epoch: 0,
            status: "exit status 1".into(),
        },
        t0,
    );
    assert!(actions.contains(&Action::Exit { code: 1 }), "{actions:?}");
    let mut l = Lifecycle::new(settings(), 0);
    l.handle(Event::Reload { waiter: None }, t0);
    let actions = l.handle(
        Event::SpawnFailed {
            epoch: 0,
            error: "no binary".into(),
        },
        t0,
    );
    assert!(actions.contains(&Action::Exit { code: 1 }), "{actions:?}");
}
