//! Log2 latency histograms as the kernel keeps them (see `monitor_common::HIST_SLOTS`), with the
//! quantile estimates and Prometheus buckets derived from them.
use monitor_common::{HIST_SLOTS, slot_upper_seconds};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Log2Hist {
    pub counts: [u64; HIST_SLOTS],
}

impl Log2Hist {
    pub fn from_counts(counts: [u64; HIST_SLOTS]) -> Self {
        Self { counts }
    }

    #[cfg(test)]
    pub fn add_slot(&mut self, slot: usize, n: u64) {
        if let Some(c) = self.counts.get_mut(slot.min(HIST_SLOTS - 1)) {
            *c += n;
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Lower bound of slot `i` in seconds (0 for the first slot).
    pub fn slot_lower_seconds(i: usize) -> f64 {
        if i == 0 {
            0.0
        } else {
            slot_upper_seconds(i - 1)
        }
    }

    /// Estimated `q` quantile in seconds, interpolating linearly inside the bucket (the same
    /// estimate `histogram_quantile` makes from the exported buckets). None when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            if (seen + c) as f64 >= rank {
                let lo = Self::slot_lower_seconds(i);
                let hi = slot_upper_seconds(i);
                let frac = ((rank - seen as f64) / c as f64).clamp(0.0, 1.0);
                return Some(lo + (hi - lo) * frac);
            }
            seen += c;
        }
        Some(slot_upper_seconds(HIST_SLOTS - 1))
    }

    /// Cumulative Prometheus buckets `(le seconds, count)` for every slot but the last, which
    /// also holds everything longer than its bound and so belongs to `+Inf` (the total) only.
    pub fn cumulative_buckets(&self) -> Vec<(f64, u64)> {
        let mut acc = 0;
        self.counts[..HIST_SLOTS - 1]
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                acc += c;
                (slot_upper_seconds(i), acc)
            })
            .collect()
    }
}

/// Seconds as a short human string ("83 ms", "1.2 s", "65 us").
pub fn fmt_seconds(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{:.0} us", s * 1e6)
    }
}

/// Bytes as a short human string.
pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use monitor_common::hist_slot;

    #[test]
    fn the_overflow_slot_is_only_in_inf() {
        let mut h = super::Log2Hist::default();
        h.add_slot(0, 1);
        h.add_slot(monitor_common::HIST_SLOTS - 1, 2); // 36 minutes and longer
        let b = h.cumulative_buckets();
        assert_eq!(b.len(), monitor_common::HIST_SLOTS - 1);
        assert_eq!(b.last().unwrap().1, 1);
        assert_eq!(h.total(), 3);
    }

    #[test]
    fn quantiles_fall_in_the_right_bucket() {
        let mut h = Log2Hist::default();
        for ns in [65_000u64; 90].iter().chain([5_000_000u64; 10].iter()) {
            h.add_slot(hist_slot(*ns), 1);
        }
        let p50 = h.quantile(0.5).unwrap();
        assert!((32e-6..=128e-6).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!((4.096e-3..=8.192e-3).contains(&p99), "{p99}");
        assert_eq!(h.total(), 100);
        let b = h.cumulative_buckets();
        assert_eq!(b.last().unwrap().1, 100);
        assert!(b.windows(2).all(|w| w[0].1 <= w[1].1 && w[0].0 < w[1].0));
    }

    #[test]
    fn empty_has_no_quantile() {
        assert_eq!(Log2Hist::default().quantile(0.5), None);
        assert_eq!(fmt_bytes(2048), "2.0 KiB");
        assert_eq!(fmt_seconds(0.083), "83.0 ms");
    }
}
