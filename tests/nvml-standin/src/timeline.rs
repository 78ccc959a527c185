//! Utilization samples from busy intervals: the pure core of `nvmlDeviceGetSamples`.
//!
//! Time is cut into periods of `period_ns` on `CLOCK_MONOTONIC`: period `k` (k ≥ 0) ends at
//! `origin_ns + k × period_ns` and starts `period_ns` earlier, so period 0 (the baseline) ends at
//! the origin (the time of `nvmlInit`). Period `k` is published once its end is at least `lag_ns`
//! in the past; its value is the percentage of the period covered by the union of the busy
//! intervals known at that moment. Intervals learnt later are ignored for published periods.

use std::collections::VecDeque;

/// Most samples kept per GPU (the oldest are dropped). The real driver keeps roughly 120 (about
/// 20 s at 1/6 s); 1000 covers 100 s at the default 100 ms period, so a slow poller loses nothing.
pub const MAX_SAMPLES: usize = 1000;

/// One published utilization sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Monotonic ns at which the sample's period ends.
    pub end_ns: u64,
    /// Share of the period covered by busy intervals, 0..=100.
    pub percent: f64,
}

/// What a `busy` line was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusyLine {
    /// `<start_ns> <end_ns>` with `start_ns <= end_ns`.
    Interval(u64, u64),
    /// Empty or whitespace only: ignored, not garbage.
    Blank,
    /// Anything else: ignored and counted.
    Garbage,
}

/// Parses one line of a `busy` file.
pub fn parse_busy_line(line: &str) -> BusyLine {
    let mut words = line.split_whitespace();
    let (Some(a), Some(b), None) = (words.next(), words.next(), words.next()) else {
        return if line.trim().is_empty() {
            BusyLine::Blank
        } else {
            BusyLine::Garbage
        };
    };
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(start), Ok(end)) if start <= end => BusyLine::Interval(start, end),
        _ => BusyLine::Garbage,
    }
}

/// The busy intervals of one GPU and the samples published from them.
#[derive(Debug)]
pub struct Timeline {
    origin_ns: u64,
    period_ns: u64,
    lag_ns: u64,
    /// Index of the first period not yet published.
    next_k: u64,
    /// Known intervals that may still matter (they end after the start of period `next_k`).
    intervals: Vec<(u64, u64)>,
    samples: VecDeque<Sample>,
    /// Lines that were not `<start_ns> <end_ns>`.
    pub garbage: u64,
    /// Intervals that ended before the first unpublished period: too late to count.
    pub late: u64,
}

impl Timeline {
    pub fn new(origin_ns: u64, period_ns: u64, lag_ns: u64) -> Self {
        assert!(period_ns > 0);
        Self {
            origin_ns,
            period_ns,
            lag_ns,
            next_k: 0,
            intervals: Vec::new(),
            samples: VecDeque::new(),
            garbage: 0,
            late: 0,
        }
    }

    /// Monotonic ns at which period `k` ends.
    fn period_end(&self, k: u64) -> u64 {
        self.origin_ns + k * self.period_ns
    }

    /// Monotonic ns at which period `k` starts.
    fn period_start(&self, k: u64) -> u64 {
        self.period_end(k).saturating_sub(self.period_ns)
    }

    /// Takes one line of the `busy` file.
    pub fn ingest_line(&mut self, line: &str) {
        match parse_busy_line(line) {
            BusyLine::Interval(start, end) => self.add_interval(start, end),
            BusyLine::Blank => {}
            BusyLine::Garbage => self.garbage += 1,
        }
    }

    /// Records that the GPU was busy from `start_ns` to `end_ns` (monotonic).
    pub fn add_interval(&mut self, start_ns: u64, end_ns: u64) {
        if end_ns <= self.period_start(self.next_k) {
            self.late += 1;
        } else if start_ns < end_ns {
            self.intervals.push((start_ns, end_ns));
        }
    }

    /// Publishes every period that ended at least `lag_ns` before `now_ns`.
    pub fn publish(&mut self, now_ns: u64) {
        let Some(horizon) = now_ns.checked_sub(self.lag_ns) else {
            return;
        };
        let Some(since_origin) = horizon.checked_sub(self.origin_ns) else {
            return;
        };
        let last_k = since_origin / self.period_ns;
        if last_k < self.next_k {
            return;
        }
        // Periods that would be dropped at once are not computed.
        let first_k = self
            .next_k
            .max((last_k + 1).saturating_sub(MAX_SAMPLES as u64));
        let merged = merge(std::mem::take(&mut self.intervals));
        for k in first_k..=last_k {
            let (start, end) = (self.period_start(k), self.period_end(k));
            let percent = if end > start {
                coverage(&merged, start, end) as f64 * 100.0 / (end - start) as f64
            } else {
                0.0
            };
            self.samples.push_back(Sample {
                end_ns: end,
                percent,
            });
        }
        while self.samples.len() > MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.next_k = last_k + 1;
        let keep_after = self.period_start(self.next_k);
        self.intervals = merged
            .into_iter()
            .filter(|&(_, e)| e > keep_after)
            .collect();
    }

    /// Published samples, oldest first (at most [`MAX_SAMPLES`]).
    pub fn samples(&self) -> &VecDeque<Sample> {
        &self.samples
    }

    /// Utilization (0..=1) of the newest published period; 0 before the first one.
    pub fn recent_utilization(&self) -> f64 {
        self.samples.back().map_or(0.0, |s| s.percent / 100.0)
    }

    /// Number of intervals held (for the memory bound test).
    #[cfg(test)]
    fn held_intervals(&self) -> usize {
        self.intervals.len()
    }
}

/// Sorts intervals and merges overlapping or touching ones: a sorted disjoint union.
pub fn merge(mut intervals: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    intervals.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(intervals.len());
    for (s, e) in intervals {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Length of `[a, b)` covered by `merged` (sorted, disjoint).
pub fn coverage(merged: &[(u64, u64)], a: u64, b: u64) -> u64 {
    let first = merged.partition_point(|&(_, e)| e <= a);
    merged[first..]
        .iter()
        .take_while(|&&(s, _)| s < b)
        .map(|&(s, e)| e.min(b) - s.max(a))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    /// Origin well after zero, like a real monotonic clock.
    const T0: u64 = 1_000_000 * MS;

    fn values(t: &Timeline) -> Vec<(u64, f64)> {
        t.samples()
            .iter()
            .map(|s| ((s.end_ns - T0) / MS, s.percent))
            .collect()
    }

    #[test]
    fn parses_busy_lines() {
        assert_eq!(parse_busy_line("10 20"), BusyLine::Interval(10, 20));
        assert_eq!(parse_busy_line("  10\t20 "), BusyLine::Interval(10, 20));
        assert_eq!(parse_busy_line("5 5"), BusyLine::Interval(5, 5));
        assert_eq!(parse_busy_line(""), BusyLine::Blank);
        assert_eq!(parse_busy_line("   "), BusyLine::Blank);
        for bad in ["20 10", "10", "10 20 30", "a b", "-1 5", "1.5 2", "10 2x"] {
            assert_eq!(parse_busy_line(bad), BusyLine::Garbage, "{bad:?}");
        }
    }

    #[test]
    fn merge_and_coverage() {
        let m = merge(vec![(50, 60), (10, 20), (15, 30), (30, 35), (70, 70)]);
        assert_eq!(m, vec![(10, 35), (50, 60), (70, 70)]);
        assert_eq!(coverage(&m, 0, 100), 35);
        assert_eq!(coverage(&m, 20, 55), 20);
        assert_eq!(coverage(&m, 35, 50), 0);
        assert_eq!(coverage(&m, 12, 13), 1);
    }

    #[test]
    fn periods_are_published_after_the_lag() {
        let mut t = Timeline::new(T0, 100 * MS, 1000 * MS);
        t.publish(T0 + 999 * MS);
        assert!(t.samples().is_empty(), "baseline not yet lag old");
        t.publish(T0 + 1000 * MS);
        assert_eq!(values(&t), vec![(0, 0.0)], "baseline ends at the origin");
        t.publish(T0 + 1250 * MS);
        assert_eq!(values(&t), vec![(0, 0.0), (100, 0.0), (200, 0.0)]);
        t.publish(T0 + 1260 * MS);
        assert_eq!(t.samples().len(), 3);
    }

    #[test]
    fn overlapping_unsorted_intervals_count_once() {
        let mut t = Timeline::new(T0, 100 * MS, 0);
        let ms = |x: u64| T0 + x * MS;
        // Baseline period: [-100, 0] ms; a step that started before the origin.
        t.ingest_line(&format!("{} {}", ms(0) - 30 * MS, ms(0) - 10 * MS));
        // Period 1 [0, 100]: 20..60 and 40..80 overlap: 60 ms.
        t.ingest_line(&format!("{} {}", ms(40), ms(80)));
        t.ingest_line(&format!("{} {}", ms(20), ms(60)));
        // Straddles periods 2 and 3: 150..250.
        t.ingest_line(&format!("{} {}", ms(150), ms(250)));
        // Period 4 fully busy, by two touching intervals given in reverse order.
        t.ingest_line(&format!("{} {}", ms(350), ms(400)));
        t.ingest_line(&format!("{} {}", ms(300), ms(350)));
        t.ingest_line("garbage");
        t.ingest_line("");
        t.publish(ms(450));
        assert_eq!(
            values(&t),
            vec![
                (0, 20.0),
                (100, 60.0),
                (200, 50.0),
                (300, 50.0),
                (400, 100.0)
            ]
        );
        assert_eq!(t.garbage, 1);
        assert_eq!(t.recent_utilization(), 1.0);
    }

    #[test]
    fn fractional_values_are_not_rounded() {
        let mut t = Timeline::new(T0, 3 * MS, 0);
        t.add_interval(T0 + 1, T0 + 1 + MS);
        t.publish(T0 + 3 * MS);
        let v = values(&t);
        assert_eq!(v[1].0, 3);
        assert!((v[1].1 - 100.0 / 3.0).abs() < 1e-9, "{v:?}");
    }

    #[test]
    fn late_intervals_do_not_change_published_periods() {
        let mut t = Timeline::new(T0, 100 * MS, 0);
        t.publish(T0 + 100 * MS);
        assert_eq!(t.samples().len(), 2);
        // Period 1 is published: an interval inside it that is learnt now is too late...
        t.add_interval(T0 + 10 * MS, T0 + 50 * MS);
        assert_eq!(t.late, 1);
        // ...but one that ends in the next period still counts there.
        t.add_interval(T0 + 50 * MS, T0 + 150 * MS);
        assert_eq!(t.late, 1);
        t.publish(T0 + 200 * MS);
        assert_eq!(values(&t)[1..], [(100, 0.0), (200, 50.0)]);
    }

    #[test]
    fn memory_is_bounded() {
        let mut t = Timeline::new(T0, MS, 0);
        for k in 0..5000u64 {
            t.add_interval(T0 + k * MS, T0 + k * MS + MS / 2);
            if k % 7 == 0 {
                t.publish(T0 + k * MS);
            }
        }
        // A long silence: only the newest MAX_SAMPLES periods are computed and kept.
        t.publish(T0 + 1_000_000 * MS);
        assert_eq!(t.samples().len(), MAX_SAMPLES);
        assert_eq!(t.samples().back().unwrap().end_ns, T0 + 1_000_000 * MS);
        assert_eq!(t.held_intervals(), 0);
        let ends: Vec<u64> = t.samples().iter().map(|s| s.end_ns).collect();
        assert!(ends.windows(2).all(|w| w[1] == w[0] + MS));
    }

    #[test]
    fn steps_before_the_timeline_are_late() {
        let mut t = Timeline::new(T0, 100 * MS, 0);
        t.add_interval(T0 - 500 * MS, T0 - 400 * MS);
        assert_eq!(t.late, 1);
        t.add_interval(T0 - 200 * MS, T0 - 50 * MS);
        t.publish(T0);
        assert_eq!(values(&t), vec![(0, 50.0)]);
    }
}
