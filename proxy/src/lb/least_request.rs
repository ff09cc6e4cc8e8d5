//! Least request: the host with the fewest requests in flight, for its weight.
//!
//! As in Envoy, the algorithm depends on whether the hosts' weights are equal.
//!
//! - **Equal weights:** power of two choices ([`two_choices`]). Two hosts drawn at random, the
//!   one with fewer requests in flight goes. O(1), no state, and a host with the most requests
//!   in flight gets no new one until it has drained to the others' level.
//! - **Unequal weights:** a smooth weighted round robin ([`Credits`]) over effective weights
//!   `weight / (in_flight + 1)`, which is Envoy's formula with its default
//!   `active_request_bias` of 1. With nothing in flight this is the weighted round robin itself:
//!   weights 2 and 1 give exactly two requests in three to the first, interleaved. As requests
//!   pile up on a host, its effective weight falls and the others take more.
//!
//! Why not P2C with unequal weights: comparing `(in_flight + 1) / weight` of two drawn hosts
//! makes the heavier one win every tie, so with nothing in flight it takes everything; and
//! choosing between the two at random by weight does not give the weights' shares either
//! (weights 2 and 1 drawn by weight, then chosen by weight, give 74% and 26%).
//!
//! Why a scan rather than Envoy's earliest-deadline-first heap: a heap entry's deadline is
//! computed when its host was last picked, so a host that has since become loaded keeps its old
//! place; the scan reads every host's load at every pick. It costs a few additions and compares
//! per host (a division only for a host with requests in flight), as nginx's smooth weighted
//! round robin does; clusters with unequal weights are seldom more than a few dozen hosts. The
//! credits are per worker and per cluster, allocated once per cluster snapshot, never per
//! request.

/// Effective weights are `weight * SCALE / (in_flight + 1)`, in whole numbers, so that the
/// shares with nothing in flight are exact and a loaded host keeps a fine-grained weight.
/// Weights are at most 10000 (the config's bound), so an effective weight stays under 2^30 and
/// the credits of even a million hosts stay far inside an `i64`.
const SCALE: u64 = 1 << 16;

/// A host's weight as the scan counts it: never 0, so that a host however loaded keeps a small
/// share (as in Envoy, it is never starved outright; it gets picked less and less often).
fn effective(weight: u32, in_flight: u32) -> i64 {
    let w = u64::from(weight.max(1)) * SCALE;
    let w = if in_flight == 0 {
        w
    } else {
        w / (u64::from(in_flight) + 1)
    };
    w.max(1) as i64
}

/// Power of two choices among `hosts` of equal weight: two different hosts drawn at random
/// (when there are two), the one with fewer requests `in_flight` goes.
pub fn two_choices(hosts: usize, in_flight: impl Fn(usize) -> u32) -> Option<usize> {
    if hosts < 2 {
        return (hosts == 1).then_some(0);
    }
    let a = fastrand::usize(..hosts);
    let b = (a + 1 + fastrand::usize(..hosts - 1)) % hosts;
    Some(if in_flight(b) < in_flight(a) { b } else { a })
}

/// One worker's smooth-weighted-round-robin credits over one cluster's hosts (unequal weights).
/// At each pick every host that may go gains its effective weight; the one with the most credit
/// goes and pays the sum of what was given out.
#[derive(Debug, Default)]
pub struct Credits {
    /// The snapshot the credits are for: a host's index means nothing in another.
    version: u64,
    credit: Vec<i64>,
}

impl Credits {
    /// The next host of the `hosts` of snapshot `version`. `load(i)` is host `i`'s weight and
    /// requests in flight, or `None` for a host not to pick (one a retry already tried).
    /// `None` when no host may go.
    pub fn pick(
        &mut self,
        version: u64,
        hosts: usize,
        load: impl Fn(usize) -> Option<(u32, u32)>,
    ) -> Option<usize> {
        if self.version != version || self.credit.len() != hosts {
            // A new snapshot: start over (its hosts may be others, in another order).
            self.version = version;
            self.credit.clear();
            self.credit.resize(hosts, 0);
        }
        let mut given = 0i64;
        let mut best: Option<usize> = None;
        for i in 0..hosts {
            let Some((weight, in_flight)) = load(i) else {
                continue;
            };
            let w = effective(weight, in_flight);
            self.credit[i] += w;
            given += w;
            if best.is_none_or(|b| self.credit[i] > self.credit[b]) {
                best = Some(i);
            }
        }
        let best = best?;
        self.credit[best] -= given;
        Some(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(n: usize, mut pick: impl FnMut() -> usize, hosts: usize) -> Vec<usize> {
        let mut counts = vec![0; hosts];
        for _ in 0..n {
            counts[pick()] += 1;
        }
        counts
    }

    #[test]
    fn with_nothing_in_flight_hosts_get_their_weights_share_interleaved() {
        let weights = [2u32, 1];
        let mut credits = Credits::default();
        let order: Vec<usize> = (0..6)
            .map(|_| credits.pick(1, 2, |i| Some((weights[i], 0))).unwrap())
            .collect();
        assert_eq!(order, [0, 1, 0, 0, 1, 0]);
        let got = counts(
            600,
            || credits.pick(1, 2, |i| Some((weights[i], 0))).unwrap(),
            2,
        );
        assert_eq!(got, [400, 200]);
        let weights = [5u32, 1, 3, 1];
        let got = counts(
            1000,
            || credits.pick(2, 4, |i| Some((weights[i], 0))).unwrap(),
            4,
        );
        assert_eq!(got, [500, 100, 300, 100]);
    }

    #[test]
    fn a_loaded_host_gets_less_and_is_never_starved() {
        // Weights 2 and 1, the first with 3 requests in flight: effective weights 2/4 and 1,
        // so the first gets one pick in three instead of two.
        let mut credits = Credits::default();
        let load = |i: usize| Some(if i == 0 { (2, 3) } else { (1, 0) });
        let got = counts(600, || credits.pick(1, 2, load).unwrap(), 2);
        assert_eq!(got, [200, 400]);
        let load = |i: usize| Some(if i == 0 { (2, u32::MAX) } else { (1, 0) });
        let got = counts(100_000, || credits.pick(1, 2, load).unwrap(), 2);
        assert!(got[0] > 0 && got[0] < 10, "{got:?}");
    }

    #[test]
    fn hosts_not_to_pick_are_passed_over() {
        let mut credits = Credits::default();
        for _ in 0..100 {
            let pick = credits.pick(1, 3, |i| (i != 0).then_some((5 - i as u32, 0)));
            assert_ne!(pick, Some(0));
        }
        assert_eq!(credits.pick(1, 2, |_| None), None);
    }

    #[test]
    fn a_new_snapshot_starts_the_credits_over() {
        let mut credits = Credits::default();
        credits.pick(1, 3, |_| Some((1, 0)));
        // Two hosts now, in a new snapshot: no index out of bounds, fresh credits.
        assert_eq!(credits.pick(2, 2, |i| Some((1 + i as u32, 0))), Some(1));
    }

    #[test]
    fn two_choices_never_takes_the_busier_of_two() {
        let in_flight = |i: usize| if i == 0 { 5 } else { 0 };
        for _ in 0..200 {
            assert_eq!(two_choices(2, in_flight), Some(1));
        }
        assert_eq!(two_choices(1, in_flight), Some(0));
        assert_eq!(two_choices(0, in_flight), None);
        // With nothing in flight, an even spread.
        let got = counts(3000, || two_choices(3, |_| 0).unwrap(), 3);
        assert!(got.iter().all(|&c| (800..1200).contains(&c)), "{got:?}");
    }
}
