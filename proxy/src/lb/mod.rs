//! Load-balancing tables: built once per cluster snapshot on the main thread, read by every
//! worker without a lock.
//!
//! A table is built over the hosts a snapshot lets requests go to (the healthy ones, or all of
//! them in panic mode), so a host that leaves is simply not in the next table. Each balancer
//! answers with an index into that list. What changes per request (a round-robin cursor,
//! least-request credits, random draws, active request counts) lives outside the table: in the
//! worker or in the host.

pub mod least_request;

use std::net::SocketAddr;

use xxhash_rust::xxh64::xxh64;

/// How a cluster spreads requests over its hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Weighted round robin, interleaved (a host of weight 3 does not take three in a row).
    RoundRobin,
    /// The host with the fewest active requests for its weight: of two hosts drawn at random,
    /// the one with fewer (equal weights); a smooth weighted round robin over
    /// `weight / (active + 1)` (unequal weights). See [`least_request`].
    LeastRequest,
    /// A host drawn at random, by weight.
    Random,
    /// Consistent hashing on a ring (Ketama): a key stays on its host, and a host that leaves
    /// moves only its own keys.
    RingHash,
    /// Consistent hashing with Google's Maglev table: even spread, near-minimal disruption.
    Maglev,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round_robin",
            Policy::LeastRequest => "least_request",
            Policy::Random => "random",
            Policy::RingHash => "ring_hash",
            Policy::Maglev => "maglev",
        }
    }

    pub fn uses_hash(self) -> bool {
        matches!(self, Policy::RingHash | Policy::Maglev)
    }
}

/// Points on a ring per unit of weight: enough for an even spread (within a few percent).
pub const RING_POINTS_PER_WEIGHT: u64 = 256;
/// Most points on a ring (Envoy's `maximum_ring_size`).
const MAX_RING_SIZE: u64 = 1 << 20;
/// Entries of a Maglev table: a prime (Envoy's default table size).
pub const MAGLEV_TABLE_SIZE: usize = 65537;
/// Longest round-robin schedule; heavier weights are scaled down to fit.
const MAX_SCHEDULE: u64 = 1 << 16;

/// What a balancer needs of a host to build its table.
#[derive(Debug, Clone, Copy)]
pub struct Member {
    pub address: SocketAddr,
    pub weight: u32,
}

/// A balancer's table over `members` (indexes in the answers are into that list).
#[derive(Debug)]
pub enum Table {
    /// Hosts in the order a weighted round robin visits them.
    Schedule(Vec<u32>),
    /// Running sums of weights, for draws by weight (random; least request builds it too, but
    /// picks by its hosts' loads: see [`least_request`]).
    Weights(Vec<u64>),
    /// Sorted `(hash, host)` points.
    Ring(Vec<(u64, u32)>),
    /// `MAGLEV_TABLE_SIZE` slots, each a host.
    Maglev(Vec<u32>),
    /// No host to go to.
    Empty,
}

impl Table {
    pub fn build(policy: Policy, members: &[Member]) -> Table {
        if members.is_empty() {
            return Table::Empty;
        }
        match policy {
            Policy::RoundRobin => Table::Schedule(schedule(members)),
            Policy::LeastRequest | Policy::Random => Table::Weights(
                members
                    .iter()
                    .scan(0u64, |sum, m| {
                        *sum += u64::from(m.weight.max(1));
                        Some(*sum)
                    })
                    .collect(),
            ),
            Policy::RingHash => Table::Ring(ring(members)),
            Policy::Maglev => Table::Maglev(maglev(members)),
        }
    }

    /// The `n`th host of the round-robin schedule.
    pub fn scheduled(&self, n: usize) -> Option<usize> {
        match self {
            Table::Schedule(s) if !s.is_empty() => Some(s[n % s.len()] as usize),
            _ => self.drawn(fastrand::u64(..)),
        }
    }

    /// The host a draw falls on, by weight (`draw` is any random number).
    pub fn drawn(&self, draw: u64) -> Option<usize> {
        match self {
            Table::Weights(sums) => {
                let total = *sums.last()?;
                let at = draw % total;
                Some(sums.partition_point(|&s| s <= at))
            }
            Table::Schedule(s) if !s.is_empty() => {
                Some(s[(draw % s.len() as u64) as usize] as usize)
            }
            Table::Ring(points) if !points.is_empty() => {
                Some(points[(draw % points.len() as u64) as usize].1 as usize)
            }
            Table::Maglev(slots) => Some(slots[(draw % slots.len() as u64) as usize] as usize),
            _ => None,
        }
    }

    /// The host a hash key goes to, passing over hosts `skip` refuses (a retry goes to the next
    /// host on the ring, or in Maglev to the slot of a perturbed key); `None` only when the
    /// table is empty: if every host is refused, the key's own host is the answer.
    pub fn hashed_skipping(&self, hash: u64, skip: impl Fn(usize) -> bool) -> Option<usize> {
        match self {
            Table::Ring(points) => {
                if points.is_empty() {
                    return None;
                }
                let start = points.partition_point(|&(h, _)| h < hash);
                let mut first = None;
                for k in 0..points.len() {
                    let host = points[(start + k) % points.len()].1 as usize;
                    first.get_or_insert(host);
                    if !skip(host) {
                        return Some(host);
                    }
                }
                first
            }
            Table::Maglev(slots) => {
                let first = self.hashed(hash)?;
                (0..16u64)
                    .map(|k| {
                        slots[(hash.wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                            % slots.len() as u64) as usize] as usize
                    })
                    .find(|&h| !skip(h))
                    .or(Some(first))
            }
            _ => self.hashed(hash),
        }
    }

    /// The host a hash key goes to (ring hash, Maglev); other tables draw at random.
    pub fn hashed(&self, hash: u64) -> Option<usize> {
        match self {
            Table::Ring(points) => {
                if points.is_empty() {
                    return None;
                }
                let i = points.partition_point(|&(h, _)| h < hash);
                Some(points[if i == points.len() { 0 } else { i }].1 as usize)
            }
            Table::Maglev(slots) => Some(slots[(hash % slots.len() as u64) as usize] as usize),
            _ => self.drawn(hash),
        }
    }
}

/// Hashes a request's key for ring hash and Maglev.
pub fn hash_key(key: &[u8]) -> u64 {
    xxh64(key, 0)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Smooth weighted round robin (as nginx does it): each step every host gains its weight, the
/// one with the most goes and pays the total. Weights {5, 1, 1} give a a b a c a a.
fn schedule(members: &[Member]) -> Vec<u32> {
    let weights: Vec<u64> = members.iter().map(|m| u64::from(m.weight.max(1))).collect();
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let mut weights: Vec<u64> = weights.iter().map(|w| w / g).collect();
    let mut total: u64 = weights.iter().sum();
    if total > MAX_SCHEDULE {
        // Keep the proportions, within a step, and every host at least once.
        weights = weights
            .iter()
            .map(|w| (w * MAX_SCHEDULE / total).max(1))
            .collect();
        total = weights.iter().sum();
    }
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += *w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        out.push(best as u32);
    }
    out
}

/// A Ketama ring: each host gets [`RING_POINTS_PER_WEIGHT`] points per unit of weight, placed
/// by the hash of `"<address>_<n>"`. A host's points do not depend on the others, so a host that
/// leaves takes only its own points away: only its keys move.
fn ring(members: &[Member]) -> Vec<(u64, u32)> {
    // Weights count by their ratios: 100 and 200 make the ring 1 and 2 make.
    let g = members
        .iter()
        .map(|m| u64::from(m.weight.max(1)))
        .fold(0, gcd)
        .max(1);
    let total: u64 = members.iter().map(|m| u64::from(m.weight.max(1)) / g).sum();
    // Heavy weights are scaled down to keep the ring bounded.
    let per_weight = RING_POINTS_PER_WEIGHT.min((MAX_RING_SIZE / total).max(1));
    let mut points = Vec::new();
    for (i, m) in members.iter().enumerate() {
        let n = per_weight * (u64::from(m.weight.max(1)) / g).max(1);
        let address = m.address.to_string();
        for k in 0..n {
            points.push((hash_key(format!("{address}_{k}").as_bytes()), i as u32));
        }
    }
    points.sort_unstable();
    points
}

/// Maglev's lookup table (Eisenbud et al., 2016), weighted: each host walks its own
/// permutation of the slots (offset and skip from two hashes of its address) and takes the next
/// free one when its turn comes; heavier hosts get turns more often.
fn maglev(members: &[Member]) -> Vec<u32> {
    const M: u64 = MAGLEV_TABLE_SIZE as u64;
    let max_weight = members.iter().map(|m| m.weight.max(1)).max().unwrap_or(1) as f64;
    let mut hosts: Vec<(u64, u64, u64, f64, f64)> = members
        .iter()
        .map(|m| {
            let name = m.address.to_string();
            let offset = xxh64(name.as_bytes(), 0) % M;
            let skip = xxh64(name.as_bytes(), 1) % (M - 1) + 1;
            // (offset, skip, next, weight share, credit)
            (
                offset,
                skip,
                0,
                f64::from(m.weight.max(1)) / max_weight,
                0.0,
            )
        })
        .collect();
    let mut slots = vec![u32::MAX; MAGLEV_TABLE_SIZE];
    let mut filled = 0usize;
    'fill: loop {
        for (i, (offset, skip, next, share, credit)) in hosts.iter_mut().enumerate() {
            *credit += *share;
            if *credit < 1.0 {
                continue;
            }
            *credit -= 1.0;
            let mut slot = (*offset + *next * *skip) % M;
            while slots[slot as usize] != u32::MAX {
                *next += 1;
                slot = (*offset + *next * *skip) % M;
            }
            slots[slot as usize] = i as u32;
            *next += 1;
            filled += 1;
            if filled == MAGLEV_TABLE_SIZE {
                break 'fill;
            }
        }
    }
    slots
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(weights: &[u32]) -> Vec<Member> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Member {
                address: SocketAddr::from(([10, 0, 0, i as u8 + 1], 8080)),
                weight,
            })
            .collect()
    }

    fn shares(table: &Table, hosts: usize, picks: impl Iterator<Item = Option<usize>>) -> Vec<f64> {
        let _ = table;
        let mut counts = vec![0usize; hosts];
        let mut n = 0;
        for p in picks {
            counts[p.expect("a host")] += 1;
            n += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    #[test]
    fn round_robin_interleaves_by_weight() {
        let table = Table::build(Policy::RoundRobin, &members(&[5, 1, 1]));
        let order: Vec<usize> = (0..7).map(|n| table.scheduled(n).unwrap()).collect();
        assert_eq!(order, [0, 0, 1, 0, 2, 0, 0]);
        let table = Table::build(Policy::RoundRobin, &members(&[2, 2, 2]));
        let order: Vec<usize> = (0..6).map(|n| table.scheduled(n).unwrap()).collect();
        assert_eq!(order, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn huge_weights_are_scaled_into_a_bounded_schedule() {
        let table = Table::build(Policy::RoundRobin, &members(&[1_000_000, 1, 3_000_000]));
        let Table::Schedule(s) = &table else {
            panic!("a schedule")
        };
        assert!(s.len() as u64 <= MAX_SCHEDULE + 3);
        assert!(s.contains(&1), "every host is visited");
        let got = shares(&table, 3, (0..s.len()).map(|n| table.scheduled(n)));
        assert!((got[2] / got[0] - 3.0).abs() < 0.01, "{got:?}");
    }

    #[test]
    fn random_draws_follow_weights() {
        let table = Table::build(Policy::Random, &members(&[1, 3]));
        let got = shares(
            &table,
            2,
            (0..40_000).map(|_| table.drawn(fastrand::u64(..))),
        );
        assert!((got[1] - 0.75).abs() < 0.02, "{got:?}");
    }

    #[test]
    fn ring_hash_keeps_keys_and_moves_few_when_a_host_leaves() {
        let all = members(&[1, 1, 1, 1, 1]);
        let table = Table::build(Policy::RingHash, &all);
        let keys: Vec<u64> = (0..10_000)
            .map(|k| hash_key(format!("user-{k}").as_bytes()))
            .collect();
        let before: Vec<SocketAddr> = keys
            .iter()
            .map(|&h| all[table.hashed(h).unwrap()].address)
            .collect();
        // Same key, same host.
        for (k, &h) in keys.iter().enumerate().take(100) {
            assert_eq!(all[table.hashed(h).unwrap()].address, before[k]);
        }
        let got = shares(&table, 5, keys.iter().map(|&h| table.hashed(h)));
        assert!(got.iter().all(|s| (s - 0.2).abs() < 0.06), "{got:?}");
        // Host 3 leaves: only its keys move.
        let fewer: Vec<Member> = all
            .iter()
            .copied()
            .filter(|m| m.address != all[3].address)
            .collect();
        let table = Table::build(Policy::RingHash, &fewer);
        let mut moved = 0;
        for (k, &h) in keys.iter().enumerate() {
            let now = fewer[table.hashed(h).unwrap()].address;
            if now != before[k] {
                assert_eq!(
                    before[k], all[3].address,
                    "only the leaving host's keys move"
                );
                moved += 1;
            }
        }
        assert!((moved as f64 / keys.len() as f64) < 0.3, "{moved}");
    }

    #[test]
    fn maglev_spreads_evenly_and_disrupts_little() {
        let all = members(&[1, 1, 1, 1, 1]);
        let table = Table::build(Policy::Maglev, &all);
        let Table::Maglev(slots) = &table else {
            panic!("a maglev table")
        };
        let got = shares(&table, 5, slots.iter().map(|&s| Some(s as usize)));
        assert!(got.iter().all(|s| (s - 0.2).abs() < 0.005), "{got:?}");
        let keys: Vec<u64> = (0..10_000)
            .map(|k| hash_key(format!("user-{k}").as_bytes()))
            .collect();
        let before: Vec<SocketAddr> = keys
            .iter()
            .map(|&h| all[table.hashed(h).unwrap()].address)
            .collect();
        let fewer: Vec<Member> = all
            .iter()
            .copied()
            .filter(|m| m.address != all[1].address)
            .collect();
        let table = Table::build(Policy::Maglev, &fewer);
        let moved = keys
            .iter()
            .enumerate()
            .filter(|&(k, &h)| fewer[table.hashed(h).unwrap()].address != before[k])
            .count();
        // The leaving host had a fifth of the keys; Maglev moves those and a few more.
        let share = moved as f64 / keys.len() as f64;
        assert!(share > 0.15 && share < 0.3, "{share}");
    }

    #[test]
    fn maglev_weights() {
        let table = Table::build(Policy::Maglev, &members(&[1, 2]));
        let Table::Maglev(slots) = &table else {
            panic!("a maglev table")
        };
        let got = shares(&table, 2, slots.iter().map(|&s| Some(s as usize)));
        assert!((got[1] - 2.0 / 3.0).abs() < 0.01, "{got:?}");
    }

    #[test]
    fn a_retry_on_a_ring_goes_to_the_next_host() {
        let all = members(&[1, 1, 1]);
        for policy in [Policy::RingHash, Policy::Maglev] {
            let table = Table::build(policy, &all);
            for k in 0..200 {
                let h = hash_key(format!("k{k}").as_bytes());
                let first = table.hashed(h).unwrap();
                let next = table.hashed_skipping(h, |i| i == first).unwrap();
                assert_ne!(
                    first, next,
                    "{policy:?}: the retry went back to the host that failed"
                );
                assert_eq!(table.hashed_skipping(h, |_| true), Some(first));
            }
        }
    }

    #[test]
    fn ring_weights_count_by_their_ratio() {
        let Table::Ring(small) = Table::build(Policy::RingHash, &members(&[1, 2])) else {
            panic!("a ring")
        };
        let Table::Ring(large) = Table::build(Policy::RingHash, &members(&[100, 200])) else {
            panic!("a ring")
        };
        assert_eq!(small.len(), large.len());
    }

    #[test]
    fn an_empty_table_has_no_host() {
        let table = Table::build(Policy::RingHash, &[]);
        assert_eq!(table.hashed(7), None);
        assert_eq!(table.scheduled(0), None);
    }
}
