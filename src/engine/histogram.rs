//! A latency histogram of fixed size: log-linear buckets, HDR-style.
//!
//! Values below 2^([`Histogram::SUB_BITS`] + 1) have a bucket each; above,
//! every power of two `[2^e, 2^(e+1))` is split into 2^`SUB_BITS` buckets
//! of equal width, so a bucket is never wider than 2^-`SUB_BITS` of the
//! values in it. Values from [`Histogram::HIGHEST`] up share the last
//! bucket (the exact maximum is kept beside it). The counts live in one
//! fixed array allocated with the histogram: [`Histogram::record`] is a few
//! integer operations and never allocates, and memory stays the same however
//! many values are recorded.
//!
//! Precision: a quantile is answered with the middle of the bucket that
//! holds the sample of that rank (clamped to the recorded minimum and
//! maximum), so it is within 2^-(`SUB_BITS` + 1) (≤ 0.8 %) of that sample.

use std::fmt;

const SUB_BITS: u32 = 6;
const HIGH_BITS: u32 = 40;
const LEN: usize = ((HIGH_BITS - SUB_BITS + 1) as usize) << SUB_BITS;

/// A histogram of `u64` values (the library records nanoseconds).
#[derive(Clone, PartialEq, Eq)]
pub struct Histogram {
    counts: Box<[u64; LEN]>,
    count: u64,
    sum: u64,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: Box::new([0; LEN]),
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }
}

impl Histogram {
    /// Bits of sub-bucket precision per power of two.
    pub const SUB_BITS: u32 = SUB_BITS;
    /// Values from here up share the last bucket (2^40: in nanoseconds,
    /// about 18 minutes).
    pub const HIGHEST: u64 = 1 << HIGH_BITS;

    /// An empty histogram.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one value.
    #[inline]
    pub fn record(&mut self, value: u64) {
        self.record_n(value, 1);
    }

    /// Records `n` occurrences of `value`.
    #[inline]
    pub fn record_n(&mut self, value: u64, n: u64) {
        if n == 0 {
            return;
        }
        self.counts[index(value)] += n;
        self.count += n;
        self.sum = self.sum.saturating_add(value.saturating_mul(n));
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// Adds every value recorded in `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (c, o) in self.counts.iter_mut().zip(other.counts.iter()) {
            *c = c.saturating_add(*o);
        }
        self.count = self.count.saturating_add(other.count);
        self.sum = self.sum.saturating_add(other.sum);
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The smallest value recorded.
    pub fn min(&self) -> Option<u64> {
        (self.count > 0).then_some(self.min)
    }

    /// The largest value recorded (exact, even past [`Histogram::HIGHEST`]).
    pub fn max(&self) -> Option<u64> {
        (self.count > 0).then_some(self.max)
    }

    /// The sum of the values recorded (saturating).
    pub fn sum(&self) -> u64 {
        self.sum
    }

    /// The mean of the values recorded.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum as f64 / self.count as f64)
    }

    /// The value at quantile `q` (0 ≤ q ≤ 1): the sample of rank
    /// ⌈q·count⌉ (at least 1) in sorted order, within the stated
    /// precision. `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                if i == LEN - 1 {
                    // Past HIGHEST: no precision; the maximum is exact.
                    return Some(self.max);
                }
                let (low, width) = bucket(i);
                return Some((low + width / 2).clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }

    /// The non-empty buckets, in order: (lowest value of the bucket, count).
    /// Recording each `count` times at its lowest value rebuilds the
    /// buckets (not the exact minimum, maximum and sum).
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| (bucket(i).0, c))
    }
}

impl Histogram {
    /// The histogram as a flat list of words, to carry it to another
    /// process: count, sum, minimum, maximum, then (bucket, count) for each
    /// non-empty bucket. [`Histogram::from_words`] rebuilds it exactly.
    pub fn to_words(&self) -> Vec<u64> {
        let mut w = vec![self.count, self.sum, self.min, self.max];
        for (i, &c) in self.counts.iter().enumerate() {
            if c > 0 {
                w.extend([i as u64, c]);
            }
        }
        w
    }

    /// Rebuilds a histogram from [`Histogram::to_words`]; `None` when the
    /// words are not one (a bucket out of range, counts that do not add up,
    /// a minimum above the maximum, or either outside the recorded
    /// buckets) — words may come from another process.
    pub fn from_words(words: &[u64]) -> Option<Histogram> {
        let (&[count, sum, min, max], pairs) = words.split_first_chunk::<4>()?;
        if pairs.len() % 2 != 0 {
            return None;
        }
        if count > 0 && min > max {
            return None;
        }
        let mut h = Histogram {
            count,
            sum,
            min,
            max,
            ..Histogram::default()
        };
        let mut total = 0u64;
        for p in pairs.chunks_exact(2) {
            let i = usize::try_from(p[0]).ok().filter(|&i| i < LEN)?;
            h.counts[i] = h.counts[i].checked_add(p[1])?;
            total = total.checked_add(p[1])?;
        }
        if total != count {
            return None;
        }
        if count > 0 {
            // min and max must fall in the lowest and highest buckets used.
            let first = h.counts.iter().position(|&c| c > 0)?;
            let last = h.counts.iter().rposition(|&c| c > 0)?;
            if index(min) != first || index(max) != last {
                return None;
            }
        }
        Some(h)
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count)
            .field("min", &self.min())
            .field("p50", &self.quantile(0.5))
            .field("p99", &self.quantile(0.99))
            .field("max", &self.max())
            .finish()
    }
}

/// The bucket of `value`: exact below 2^(SUB_BITS+1); above, the power of
/// two (`shift`) and the top SUB_BITS+1 bits.
#[inline]
fn index(value: u64) -> usize {
    let v = value.min(Histogram::HIGHEST - 1);
    let msb = 63 - (v | 1).leading_zeros();
    let shift = msb.saturating_sub(SUB_BITS);
    ((shift as usize) << SUB_BITS) + (v >> shift) as usize
}

/// Lowest value and width of bucket `i`.
fn bucket(i: usize) -> (u64, u64) {
    let shift = (i >> SUB_BITS).saturating_sub(1) as u32;
    let low = ((i - ((shift as usize) << SUB_BITS)) as u64) << shift;
    (low, 1 << shift)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    /// The nearest-rank quantile of sorted samples, as `quantile` defines it.
    fn exact(sorted: &[u64], q: f64) -> u64 {
        let n = sorted.len() as u64;
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        sorted[rank as usize - 1]
    }

    fn within_precision(got: u64, want: u64) -> bool {
        got.abs_diff(want) << (SUB_BITS + 1) <= want
    }

    #[test]
    fn buckets_tile_the_range_in_order() {
        let mut prev_end = 0;
        for i in 0..LEN {
            let (low, width) = bucket(i);
            assert_eq!(low, prev_end, "bucket {i} starts where {} ended", i - 1);
            assert_eq!(index(low), i);
            assert_eq!(index(low + width - 1), i);
            // No bucket is wider than 2^-SUB_BITS of its values.
            assert!(width == 1 || width << SUB_BITS <= low, "bucket {i}");
            prev_end = low + width;
        }
        assert_eq!(prev_end, Histogram::HIGHEST);
        assert_eq!(index(u64::MAX), LEN - 1);
    }

    #[test]
    fn empty_small_and_huge() {
        let mut h = Histogram::new();
        assert_eq!((h.quantile(0.5), h.min(), h.mean()), (None, None, None));
        for v in [0, 1, 2, 127] {
            h.record(v);
        }
        assert_eq!(h.quantile(0.0), Some(0));
        assert_eq!(h.quantile(0.5), Some(1));
        assert_eq!(h.quantile(0.75), Some(2));
        assert_eq!(h.quantile(1.0), Some(127));
        h.record(u64::MAX);
        assert_eq!(h.max(), Some(u64::MAX));
        assert_eq!(h.quantile(1.0), Some(u64::MAX));
        assert_eq!(h.sum(), u64::MAX);
    }

    #[test]
    fn merge_equals_recording_both() {
        let (mut a, mut b, mut both) = (Histogram::new(), Histogram::new(), Histogram::new());
        for v in 0..5000u64 {
            let x = v * v % 100_003;
            if v % 3 == 0 {
                a.record(x)
            } else {
                b.record(x)
            }
            both.record(x);
        }
        a.merge(&b);
        assert_eq!(a, both);
        let mut rebuilt = Histogram::new();
        for (low, c) in both.buckets() {
            rebuilt.record_n(low, c);
        }
        assert_eq!(rebuilt.counts, both.counts);
    }

    #[test]
    fn words_round_trip_and_refuse_what_is_not_a_histogram() {
        let mut h = Histogram::new();
        assert_eq!(Histogram::from_words(&h.to_words()), Some(h.clone()));
        for v in [0, 5, 5, 1000, 123_456_789, u64::MAX] {
            h.record(v);
        }
        let w = h.to_words();
        assert_eq!(Histogram::from_words(&w), Some(h));
        assert_eq!(Histogram::from_words(&w[..3]), None);
        assert_eq!(Histogram::from_words(&w[..w.len() - 1]), None);
        let mut miscounted = w.clone();
        miscounted[0] += 1;
        assert_eq!(Histogram::from_words(&miscounted), None);
        let mut out_of_range = w;
        out_of_range[4] = LEN as u64;
        assert_eq!(Histogram::from_words(&out_of_range), None);
    }

    proptest! {
        /// Random samples over many magnitudes: every quantile is within
        /// the stated precision of the exact nearest-rank quantile.
        #[test]
        fn quantiles_match_the_exact_ones(
            samples in prop::collection::vec((0u32..40, any::<u64>()), 1..2000),
            qs in prop::collection::vec(0.0f64..=1.0, 1..20),
        ) {
            let mut h = Histogram::new();
            let mut raw: Vec<u64> = samples
                .iter()
                .map(|&(bits, r)| r >> (63 - bits))
                .collect();
            for &v in &raw {
                h.record(v);
            }
            raw.sort_unstable();
            prop_assert_eq!(h.count(), raw.len() as u64);
            prop_assert_eq!(h.min(), raw.first().copied());
            prop_assert_eq!(h.max(), raw.last().copied());
            for q in qs.into_iter().chain([0.0, 0.5, 0.99, 0.999, 1.0]) {
                let (got, want) = (h.quantile(q).unwrap(), exact(&raw, q));
                prop_assert!(within_precision(got, want), "q {q}: {got} vs exact {want}");
            }
        }
    }

    #[test]
    fn inconsistent_words_are_refused_not_a_panic_later() {
        // min above max (it used to panic in `quantile`).
        assert_eq!(Histogram::from_words(&[1, 5, 10, 3, 4, 1]), None);
        // min and max outside the one bucket used.
        let mut h = Histogram::new();
        h.record(1000);
        let mut w = h.to_words();
        w[2] = 1;
        assert_eq!(Histogram::from_words(&w), None);
        let mut w = h.to_words();
        w[3] = 1 << 40;
        assert_eq!(Histogram::from_words(&w), None);
        assert!(Histogram::from_words(&h.to_words()).is_some());
    }
}
