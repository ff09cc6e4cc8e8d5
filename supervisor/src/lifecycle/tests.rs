use super::*;

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
