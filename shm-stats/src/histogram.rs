//! Log-linear histogram buckets: exact for the values 0 to 4, then four buckets per power of two
//! (a relative width of at most 25%), up to 2^40, then one overflow bucket.
//!
//! Bucket `i` holds the values `v` with `upper(i - 1) < v <= upper(i)`, so that the power-of-two
//! bounds are inclusive upper bounds, as Prometheus' `le` wants them. Pure functions, no I/O.

/// Buckets per power of two.
const SUB: u64 = 4;
/// The largest finite upper bound is `2^MAX_POW`.
const MAX_POW: u32 = 40;
/// Buckets of a histogram, the overflow bucket included.
pub const BUCKETS: usize = 1 + 4 + (MAX_POW as usize - 2) * SUB as usize + 1;

/// The bucket that counts `value`.
pub fn bucket(value: u64) -> usize {
    if value == 0 {
        return 0;
    }
    let u = value - 1;
    if u < SUB {
        return 1 + u as usize;
    }
    let pow = 63 - u.leading_zeros(); // floor(log2(u)), at least 2
    if pow >= MAX_POW {
        return BUCKETS - 1;
    }
    let sub = (u >> (pow - 2)) & (SUB - 1);
    1 + SUB as usize + (pow as usize - 2) * SUB as usize + sub as usize
}

/// The inclusive upper bound of bucket `i`; `u64::MAX` for the overflow bucket.
pub fn upper(i: usize) -> u64 {
    match i {
        0 => 0,
        1..=4 => i as u64,
        _ if i >= BUCKETS - 1 => u64::MAX,
        _ => {
            let j = (i - 5) as u64;
            let pow = 2 + j / SUB;
            let sub = j % SUB;
            (SUB + 1 + sub) << (pow - 2)
        }
    }
}

/// A histogram read from a region: bucket counts, sum and maximum.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Summary {
    pub buckets: Vec<u64>,
    pub sum: u64,
    pub max: u64,
}

impl Summary {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The value below which a fraction `q` (0 to 1) of the recorded values fall: the upper bound
    /// of the bucket where the cumulative count reaches `q`, but never above the maximum seen.
    pub fn quantile(&self, q: f64) -> u64 {
        let count = self.count();
        if count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return upper(i).min(self.max);
            }
        }
        self.max
    }

    /// Cumulative counts at every power-of-two bound (`le` = 1, 2, 4, ..., 2^40), for exposition
    /// formats that want few fixed buckets. The last pair is the total, under `u64::MAX` (+Inf).
    pub fn cumulative_at_powers(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::with_capacity(MAX_POW as usize + 2);
        let mut seen = 0;
        let mut next_pow = 0u32;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            let up = upper(i);
            while next_pow <= MAX_POW && up == 1u64 << next_pow {
                out.push((up, seen));
                next_pow += 1;
            }
        }
        out.push((u64::MAX, seen));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lands_in_the_bucket_whose_bounds_hold_it() {
        let mut values: Vec<u64> = (0..5000).collect();
        for p in 0..64 {
            let v = 1u64 << p;
            values.extend([v - 1, v, v + 1, v.saturating_mul(3) / 2]);
        }
        values.push(u64::MAX);
        for v in values {
            let i = bucket(v);
            assert!(i < BUCKETS, "{v}");
            assert!(v <= upper(i), "{v} above upper({i}) = {}", upper(i));
            if i > 0 {
                assert!(
                    v > upper(i - 1),
                    "{v} not above upper({}) = {}",
                    i - 1,
                    upper(i - 1)
                );
            }
        }
    }

    #[test]
    fn bounds_increase_and_are_exact_at_powers_of_two() {
        for i in 1..BUCKETS {
            assert!(upper(i) > upper(i - 1), "bucket {i}");
        }
        for p in 0..=MAX_POW {
            let v = 1u64 << p;
            assert_eq!(upper(bucket(v)), v, "2^{p} is a bucket bound");
        }
        assert_eq!(upper(BUCKETS - 2), 1 << MAX_POW);
        assert_eq!(bucket((1 << MAX_POW) + 1), BUCKETS - 1);
    }

    #[test]
    fn relative_width_is_at_most_a_quarter() {
        for i in 6..BUCKETS - 1 {
            let (lo, hi) = (upper(i - 1), upper(i));
            assert!((hi - lo) * 4 <= lo, "bucket {i}: ({lo}, {hi}]");
        }
    }

    #[test]
    fn quantiles_come_from_bucket_bounds_capped_by_the_max() {
        let mut s = Summary {
            buckets: vec![0; BUCKETS],
            sum: 0,
            max: 0,
        };
        for v in 1..=100u64 {
            s.buckets[bucket(v * 1000)] += 1;
            s.sum += v * 1000;
            s.max = s.max.max(v * 1000);
        }
        assert_eq!(s.count(), 100);
        let p50 = s.quantile(0.5);
        assert!((50_000..=50_000 * 5 / 4).contains(&p50), "p50 {p50}");
        let p99 = s.quantile(0.99);
        assert!((99_000..=100_000).contains(&p99), "p99 {p99}");
        assert_eq!(s.quantile(1.0), 100_000);
        assert_eq!(Summary::default().quantile(0.5), 0);
    }

    #[test]
    fn cumulative_counts_at_powers_of_two() {
        let mut s = Summary {
            buckets: vec![0; BUCKETS],
            ..Default::default()
        };
        for v in [1u64, 2, 3, 4, 5, 1000, u64::MAX] {
            s.buckets[bucket(v)] += 1;
        }
        let c = s.cumulative_at_powers();
        assert_eq!(c.len(), MAX_POW as usize + 2);
        assert_eq!(c[0], (1, 1));
        assert_eq!(c[1], (2, 2));
        assert_eq!(c[2], (4, 4));
        assert_eq!(c[3], (8, 5));
        assert_eq!(c[10], (1024, 6));
        assert_eq!(*c.last().unwrap(), (u64::MAX, 7));
    }
}
