//! Histogram buckets: a region's bucket bounds, the bucket a value falls in, and what readers
//! derive from the counts (quantiles, cumulative counts for Prometheus). Pure functions, no I/O.
//!
//! Every histogram of a region counts into the same buckets, chosen when the region is created
//! and stored in it (see `LAYOUT.md`), so that writers of different configurations and
//! releases that share a region, and readers outside baton, all agree on what a count means.
//! Bucket `i` holds the values `v` with `bound(i - 1) < v <= bound(i)`: the bounds are
//! inclusive upper bounds, as Prometheus' `le` wants them, and each count is exact at its
//! bound (no bucket of storage straddles a bound a scraper sees). The last bucket holds
//! everything above the last bound (`+Inf`).

#![forbid(unsafe_code)]

use std::fmt;
use std::sync::Arc;

/// The most finite bounds a region holds.
pub const MAX_BOUNDS: usize = 32;

/// The default bounds, in milliseconds: 1-2.5-5 steps per decade (the pattern of Prometheus'
/// own default buckets) from half a millisecond, where a proxied request on a local network
/// lands, to 10 s; then 30 s and 60 s, where request timeouts are usually set, so that answers
/// cut by a timeout stand out; then 5 minutes for long polls and downloads. 17 bounds and
/// `+Inf`: 20 series per histogram with `_sum` and `_count`.
pub const DEFAULT_BOUNDS_MS: [f64; 17] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0,
    30_000.0, 60_000.0, 300_000.0,
];

/// The largest bound a config may give, in milliseconds (about 11.6 days).
pub const MAX_BOUND_MS: f64 = 1e9;

/// The finite bucket bounds of a region, in the unit of its histograms (baton's are all
/// microseconds): between 1 and [`MAX_BOUNDS`] of them, each above zero, strictly increasing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    len: u8,
    values: [u64; MAX_BOUNDS],
}

/// Why a list of bounds was refused; the messages speak of milliseconds, as the config does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoundsError {
    /// No bound at all: a histogram needs at least one.
    #[error("give at least one bucket bound")]
    Empty,
    /// More bounds than a region holds.
    #[error("{0} bucket bounds; at most {MAX_BOUNDS}")]
    TooMany(usize),
    /// Bound `index` is not above the one before it.
    #[error("bucket bound {} is not above the one before it ({}): list the bounds from the smallest, each once", millis(*.value), millis(*.previous))]
    NotIncreasing {
        index: usize,
        value: u64,
        previous: u64,
    },
    /// Bound `index` is zero.
    #[error("a bucket bound is above zero")]
    Zero { index: usize },
}

impl BoundsError {
    /// The position of the bound at fault, when one is.
    pub fn index(&self) -> Option<usize> {
        match self {
            BoundsError::NotIncreasing { index, .. } | BoundsError::Zero { index } => Some(*index),
            BoundsError::Empty | BoundsError::TooMany(_) => None,
        }
    }
}

/// `us` microseconds as milliseconds, without a trailing `.0`.
fn millis(us: u64) -> String {
    format!("{}", us as f64 / 1000.0)
}

/// A bound given in milliseconds (as the config writes it) in microseconds, or why it cannot
/// be one.
pub fn bound_from_millis(ms: f64) -> Result<u64, String> {
    if !(ms.is_finite() && ms > 0.0 && ms <= MAX_BOUND_MS) {
        return Err(format!(
            "a bucket bound is a number of milliseconds above 0 and at most {MAX_BOUND_MS:e}, not {ms}"
        ));
    }
    let us = (ms * 1000.0).round();
    if (us - ms * 1000.0).abs() > 1e-6 * us.max(1.0) || us < 1.0 {
        return Err(format!(
            "bucket bound {ms}: histograms count in microseconds; give at most three decimals of a millisecond"
        ));
    }
    Ok(us as u64)
}

impl Bounds {
    /// Checks `values` (in the histograms' unit) and keeps them.
    pub fn new(values: &[u64]) -> Result<Bounds, BoundsError> {
        if values.is_empty() {
            return Err(BoundsError::Empty);
        }
        if values.len() > MAX_BOUNDS {
            return Err(BoundsError::TooMany(values.len()));
        }
        for (index, &value) in values.iter().enumerate() {
            if value == 0 {
                return Err(BoundsError::Zero { index });
            }
            if index > 0 && value <= values[index - 1] {
                return Err(BoundsError::NotIncreasing {
                    index,
                    value,
                    previous: values[index - 1],
                });
            }
        }
        let mut kept = [0; MAX_BOUNDS];
        kept[..values.len()].copy_from_slice(values);
        Ok(Bounds {
            len: values.len() as u8,
            values: kept,
        })
    }

    /// The finite bounds, increasing.
    pub fn as_slice(&self) -> &[u64] {
        &self.values[..self.len as usize]
    }

    /// Buckets of a histogram: one per bound, and the `+Inf` bucket.
    pub fn buckets(&self) -> usize {
        self.len as usize + 1
    }

    /// The bucket that counts `value`: the first whose bound is at least `value`, else `+Inf`.
    #[inline]
    pub fn bucket(&self, value: u64) -> usize {
        // A binary search (branch-free in the standard library): about 5 ns per record on
        // values of widely spread latencies, against 2 ns for the fixed log-linear buckets of
        // layout version 1; a fixed-step search and a count over all slots were slower.
        self.as_slice().partition_point(|&b| b < value)
    }

    /// The inclusive upper bound of bucket `i`; `u64::MAX` for the `+Inf` bucket.
    pub fn upper(&self, i: usize) -> u64 {
        self.as_slice().get(i).copied().unwrap_or(u64::MAX)
    }
}

impl Default for Bounds {
    fn default() -> Self {
        let us: Vec<u64> = DEFAULT_BOUNDS_MS
            .iter()
            .map(|&ms| (ms * 1000.0) as u64)
            .collect();
        Bounds::new(&us).expect("the default bounds are valid (a unit test checks them)")
    }
}

impl fmt::Debug for Bounds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl fmt::Display for Bounds {
    /// In milliseconds, as the config writes them: `[0.5, 1, 2.5]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms: Vec<String> = self.as_slice().iter().map(|&us| millis(us)).collect();
        write!(f, "[{}]", ms.join(", "))
    }
}

/// A histogram read from a region: its bounds, a count per bucket, sum and maximum.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Summary {
    /// Shared by every histogram of a snapshot.
    pub bounds: Arc<Bounds>,
    /// `bounds.buckets()` counts, the `+Inf` bucket last.
    pub buckets: Vec<u64>,
    pub sum: u64,
    pub max: u64,
}

impl Summary {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The value below which a fraction `q` (0 to 1) of the recorded values fall, estimated as
    /// Prometheus' `histogram_quantile` does: linearly within the bucket where the cumulative
    /// count reaches `q`; never above the maximum seen (which also answers for the `+Inf`
    /// bucket).
    pub fn quantile(&self, q: f64) -> u64 {
        let count = self.count();
        if count == 0 {
            return 0;
        }
        let rank = q.clamp(0.0, 1.0) * count as f64;
        let mut seen = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n > 0 && (seen + n) as f64 >= rank {
                let upper = self.bounds.upper(i);
                if upper == u64::MAX {
                    return self.max;
                }
                let lower = if i == 0 { 0 } else { self.bounds.upper(i - 1) };
                let within = ((rank - seen as f64) / n as f64).clamp(0.0, 1.0);
                let estimate = lower as f64 + (upper - lower) as f64 * within;
                return (estimate.round() as u64).min(self.max);
            }
            seen += n;
        }
        self.max
    }

    /// Cumulative counts at every bound (`le`), then the total under `u64::MAX` (`+Inf`).
    pub fn cumulative(&self) -> Vec<(u64, u64)> {
        let mut seen = 0;
        self.buckets
            .iter()
            .enumerate()
            .map(|(i, n)| {
                seen += n;
                (self.bounds.upper(i), seen)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(bounds: &[u64], values: &[u64]) -> Summary {
        let bounds = Bounds::new(bounds).unwrap();
        let mut s = Summary {
            bounds: Arc::new(bounds),
            buckets: vec![0; bounds.buckets()],
            sum: 0,
            max: 0,
        };
        for &v in values {
            s.buckets[bounds.bucket(v)] += 1;
            s.sum = s.sum.wrapping_add(v);
            s.max = s.max.max(v);
        }
        s
    }

    #[test]
    fn the_default_bounds_are_valid_and_in_microseconds() {
        let b = Bounds::default();
        assert_eq!(b.as_slice().len(), DEFAULT_BOUNDS_MS.len());
        assert_eq!(b.as_slice()[0], 500);
        assert_eq!(*b.as_slice().last().unwrap(), 300_000_000);
        assert_eq!(b.to_string().split(", ").next(), Some("[0.5"));
        assert!(b.to_string().ends_with(", 60000, 300000]"), "{b}");
    }

    #[test]
    fn every_value_lands_in_the_bucket_whose_bounds_hold_it() {
        let b = Bounds::new(&[1, 10, 100, 1000]).unwrap();
        let mut values: Vec<u64> = (0..3000).collect();
        values.extend([u64::MAX - 1, u64::MAX]);
        for v in values {
            let i = b.bucket(v);
            assert!(i < b.buckets(), "{v}");
            assert!(v <= b.upper(i), "{v} above upper({i})");
            if i > 0 {
                assert!(v > b.upper(i - 1), "{v} not above upper({})", i - 1);
            }
        }
        // A bound is inclusive: `le` counts the values equal to it.
        assert_eq!(b.bucket(10), 1);
        assert_eq!(b.bucket(11), 2);
        assert_eq!(b.bucket(1001), 4);
        assert_eq!(b.upper(4), u64::MAX);
    }

    #[test]
    fn bad_bounds_are_refused_with_the_reason() {
        assert_eq!(Bounds::new(&[]), Err(BoundsError::Empty));
        assert_eq!(
            Bounds::new(&[1; MAX_BOUNDS + 1]).unwrap_err(),
            BoundsError::TooMany(MAX_BOUNDS + 1)
        );
        let e = Bounds::new(&[500, 1000, 1000]).unwrap_err();
        assert_eq!(e.index(), Some(2));
        assert_eq!(
            e.to_string(),
            "bucket bound 1 is not above the one before it (1): list the bounds from the smallest, each once"
        );
        assert_eq!(Bounds::new(&[0, 1]).unwrap_err().index(), Some(0));
        let most: Vec<u64> = (1..=MAX_BOUNDS as u64).collect();
        assert!(Bounds::new(&most).is_ok());
    }

    #[test]
    fn bounds_in_milliseconds_become_whole_microseconds() {
        assert_eq!(bound_from_millis(0.5), Ok(500));
        assert_eq!(bound_from_millis(0.001), Ok(1));
        assert_eq!(bound_from_millis(60000.0), Ok(60_000_000));
        assert_eq!(bound_from_millis(MAX_BOUND_MS), Ok(1_000_000_000_000));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e10, 0.0001, 1.0005] {
            assert!(bound_from_millis(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quantiles_interpolate_within_buckets_capped_by_the_max() {
        // 100 values 1000..=100000 (1 ms .. 100 ms in microseconds), default bounds.
        let values: Vec<u64> = (1..=100u64).map(|v| v * 1000).collect();
        let mut s = summary(Bounds::default().as_slice(), &values);
        assert_eq!(s.count(), 100);
        // 50 values are <= 50 ms: the median is at the 50 ms bound.
        assert_eq!(s.quantile(0.5), 50_000);
        let p90 = s.quantile(0.9);
        assert!((50_000..=100_000).contains(&p90), "p90 {p90}");
        assert_eq!(s.quantile(1.0), 100_000);
        // Above the last bound, the maximum is the only estimate.
        s.buckets[s.bounds.buckets() - 1] += 1;
        s.max = 400_000_000;
        assert_eq!(s.quantile(1.0), 400_000_000);
        assert_eq!(Summary::default().quantile(0.5), 0);
    }

    #[test]
    fn cumulative_counts_at_every_bound_end_with_the_total() {
        let s = summary(&[1, 2, 4, 8], &[1, 2, 3, 4, 5, 1000, u64::MAX]);
        assert_eq!(
            s.cumulative(),
            vec![(1, 1), (2, 2), (4, 4), (8, 5), (u64::MAX, 7)]
        );
    }
}
