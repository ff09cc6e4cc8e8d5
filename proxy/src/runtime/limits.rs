//! Connection limits: how many downstream connections a generation holds, per listener and in
//! total, counted across its workers.
//!
//! A worker takes a place before it serves a connection and gives it back when the connection
//! closes. What happens to a connection that finds no place is the listener's
//! [`Overflow`](crate::config::Overflow): closed at once, or left waiting in the accept queue.
//! The limits are per generation: while a reload overlaps two generations, each has its own.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

use crate::config::Config;

/// Which limit a connection ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The listener's `max_connections`.
    Listener,
    /// The generation's `max_connections`.
    Total,
}

struct Limit {
    max: usize,
    open: AtomicUsize,
}

impl Limit {
    fn new(max: Option<usize>) -> Option<Limit> {
        max.map(|max| Limit {
            max,
            open: AtomicUsize::new(0),
        })
    }

    fn try_take(&self) -> bool {
        // Optimistic: two workers may both pass `max` for an instant; the loser gives back.
        if self.open.fetch_add(1, Ordering::AcqRel) < self.max {
            true
        } else {
            self.open.fetch_sub(1, Ordering::AcqRel);
            false
        }
    }

    fn give_back(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    fn has_room(&self) -> bool {
        self.open.load(Ordering::Acquire) < self.max
    }
}

/// The connection limits of one generation, shared by its workers.
pub struct ConnectionLimits {
    total: Option<Limit>,
    /// One per listener of the config.
    listeners: Vec<Option<Limit>>,
    /// Wakes accept loops that wait for a place (`max_connections_action = "wait"`).
    freed: Notify,
    /// Whether any listener waits for places (else nobody listens to `freed`).
    waiting: bool,
}

impl ConnectionLimits {
    pub fn new(config: &Config) -> Self {
        ConnectionLimits {
            total: Limit::new(config.max_connections),
            listeners: config
                .listeners
                .iter()
                .map(|l| Limit::new(l.max_connections))
                .collect(),
            freed: Notify::new(),
            waiting: config
                .listeners
                .iter()
                .any(|l| l.overflow == crate::config::Overflow::Wait),
        }
    }

    /// Whether a connection on `listener` is counted at all (some limit applies to it).
    pub fn limited(&self, listener: usize) -> bool {
        self.total.is_some() || self.listeners[listener].is_some()
    }

    /// Takes a place for a new connection on `listener`, or says which limit is reached.
    pub fn try_take(&self, listener: usize) -> Result<(), Full> {
        let own = self.listeners[listener].as_ref();
        if own.is_some_and(|l| !l.try_take()) {
            return Err(Full::Listener);
        }
        if self.total.as_ref().is_some_and(|t| !t.try_take()) {
            if let Some(own) = own {
                own.give_back();
                self.freed_one();
            }
            return Err(Full::Total);
        }
        Ok(())
    }

    /// Takes a place past the limit: for a connection accepted in the instant another worker
    /// took the last place, which a listener that makes clients wait serves all the same.
    pub fn force_take(&self, listener: usize) {
        if let Some(own) = &self.listeners[listener] {
            own.open.fetch_add(1, Ordering::AcqRel);
        }
        if let Some(total) = &self.total {
            total.open.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Gives back the place of a connection on `listener` that closed.
    pub fn give_back(&self, listener: usize) {
        if let Some(own) = &self.listeners[listener] {
            own.give_back();
        }
        if let Some(total) = &self.total {
            total.give_back();
        }
        self.freed_one();
    }

    fn freed_one(&self) {
        if self.waiting {
            self.freed.notify_waiters();
        }
    }

    fn has_room(&self, listener: usize) -> bool {
        self.listeners[listener]
            .as_ref()
            .is_none_or(Limit::has_room)
            && self.total.as_ref().is_none_or(Limit::has_room)
    }

    /// Resolves once `listener` may take a connection (at once if it has room now).
    pub async fn room(&self, listener: usize) {
        loop {
            let freed = self.freed.notified();
            let mut freed = std::pin::pin!(freed);
            // Registered before the check, so that a place freed in between is not missed.
            freed.as_mut().enable();
            if self.has_room(listener) {
                return;
            }
            freed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: Option<usize>, listener: Option<usize>) -> ConnectionLimits {
        ConnectionLimits {
            total: Limit::new(total),
            listeners: vec![Limit::new(listener), None],
            freed: Notify::new(),
            waiting: true,
        }
    }

    #[test]
    fn the_listener_limit_comes_first_and_places_come_back() {
        let l = limits(Some(3), Some(2));
        assert_eq!(l.try_take(0), Ok(()));
        assert_eq!(l.try_take(0), Ok(()));
        assert_eq!(l.try_take(0), Err(Full::Listener));
        assert_eq!(l.try_take(1), Ok(()));
        // The total is full: listener 1 is refused, and listener 0's place is not kept.
        assert_eq!(l.try_take(1), Err(Full::Total));
        l.give_back(0);
        assert_eq!(l.try_take(1), Ok(()));
        assert_eq!(l.try_take(0), Err(Full::Total));
        l.give_back(1);
        assert_eq!(l.try_take(0), Ok(()));
    }

    #[test]
    fn unlimited_listeners_are_not_counted() {
        let l = limits(None, None);
        assert!(!l.limited(0));
        for _ in 0..10 {
            assert_eq!(l.try_take(0), Ok(()));
        }
    }

    #[tokio::test]
    async fn a_waiting_accept_loop_wakes_when_a_place_frees() {
        let l = std::sync::Arc::new(limits(None, Some(1)));
        l.try_take(0).unwrap();
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.room(0).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        l.give_back(0);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
    }
}
