//! A lock-free latency histogram: 8 buckets per power of two (about 9%
//! resolution), from 1 us to about 18 minutes.

use std::sync::atomic::{AtomicU64, Ordering};

/// Sub-buckets per power of two.
const SUB: u32 = 8;
/// Largest power of two tracked (2^40 us); slower samples go in the last
/// bucket.
const MAX_EXP: u32 = 40;
/// Values below this are their own bucket.
const LINEAR: u64 = 2 * SUB as u64;
const BUCKETS: usize = LINEAR as usize + ((MAX_EXP - 4 + 1) * SUB) as usize;

/// Counts of samples in microseconds, safe to record from many tasks.
#[derive(Debug)]
pub struct LatencyHist {
    buckets: Vec<AtomicU64>,
}

impl Default for LatencyHist {
    fn default() -> Self {
        LatencyHist {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn index(us: u64) -> usize {
    if us < LINEAR {
        return us as usize;
    }
    let exp = (63 - us.leading_zeros()).min(MAX_EXP);
    if exp == MAX_EXP && us >> MAX_EXP > 1 {
        return BUCKETS - 1;
    }
    let mantissa = (us >> (exp - 3)) & u64::from(SUB - 1);
    LINEAR as usize + ((exp - 4) * SUB) as usize + mantissa as usize
}

/// `[low, high)` of bucket `i`, in microseconds.
fn bounds(i: usize) -> (f64, f64) {
    if (i as u64) < LINEAR {
        return (i as f64, i as f64 + 1.0);
    }
    let j = i - LINEAR as usize;
    let exp = j as u32 / SUB + 4;
    let mantissa = (j as u32 % SUB) as u64;
    let step = 1u64 << (exp - 3);
    let low = (u64::from(SUB) + mantissa) * step;
    (low as f64, (low + step) as f64)
}

impl LatencyHist {
    /// Records one sample.
    pub fn record(&self, us: u64) {
        self.buckets[index(us)].fetch_add(1, Ordering::Relaxed);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Forgets every sample.
    pub fn clear(&self) {
        for b in &self.buckets {
            b.store(0, Ordering::Relaxed);
        }
    }

    /// The `q` quantile (0 to 1) in milliseconds, interpolated inside its
    /// bucket; `None` without samples.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, &c) in counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            if (below + c) as f64 >= rank {
                let (low, high) = bounds(i);
                let within = ((rank - below as f64) / c as f64).clamp(0.0, 1.0);
                return Some((low + (high - low) * within) / 1000.0);
            }
            below += c;
        }
        let (low, _) = bounds(BUCKETS - 1);
        Some(low / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_values_in_order() {
        let mut last = 0;
        for us in [
            0u64,
            1,
            15,
            16,
            17,
            31,
            32,
            100,
            1000,
            123_456,
            1 << 39,
            u64::MAX,
        ] {
            let i = index(us);
            assert!(i >= last && i < BUCKETS, "{us} -> {i}");
            let (low, high) = bounds(i);
            if us < 1 << 40 {
                assert!(
                    low <= us as f64 && (us as f64) < high,
                    "{us} not in {low}..{high}"
                );
            }
            last = i;
        }
    }

    #[test]
    fn quantiles_are_close() {
        let h = LatencyHist::default();
        assert_eq!(h.quantile_ms(0.5), None);
        for us in 1..=10_000u64 {
            h.record(us);
        }
        let p50 = h.quantile_ms(0.5).unwrap();
        let p99 = h.quantile_ms(0.99).unwrap();
        assert!((p50 - 5.0).abs() < 0.5, "p50 {p50}");
        assert!((p99 - 9.9).abs() < 0.9, "p99 {p99}");
        h.clear();
        assert_eq!(h.count(), 0);
    }
}
