//! The verdict: one line per GPU a user can act on, from typed inputs (the attribution totals and
//! what the job's reads looked like). Live tracing and `stallmon report` both call [`verdict`].
use std::fmt::Write as _;

use crate::attribution::{
    CAUSE_HOST, CAUSE_IO, CAUSE_NAMES, CAUSE_OTHER, CAUSE_PREPROCESS, GpuTotals, NUM_CAUSES,
};

/// GPUs are "GPU-bound" when idle less than this fraction of the wall time.
pub const GPU_BOUND_IDLE_FRACTION: f64 = 0.10;

/// What a verdict can say beyond the totals.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VerdictContext {
    /// The GPU is the simulated one.
    pub simulated: bool,
    /// Block device most of the job's reads went to, e.g. "vda".
    pub read_device: Option<String>,
    /// 99th percentile of the job's read latency, seconds.
    pub read_p99_s: Option<f64>,
    /// `read_p99_s` is the p99 of read stalls (sleeps inside reads, the default mode), not of
    /// whole calls (`--syscalls`).
    pub p99_of_stalls: bool,
    /// Directory the job read most from.
    pub hottest_path: Option<String>,
    /// The rank this GPU belongs to, named when the job has several.
    pub rank: Option<String>,
}

/// One line a user can act on, e.g.
/// `GPU 0 idle 41% of 10m12s: io 33%, preprocess 5%, host 2%, other 1% -- storage-bound: workers'
/// reads p99 83 ms on vda, hottest path /data/train`.
pub fn verdict(total: &GpuTotals, context: &VerdictContext) -> String {
    let mut line = String::new();
    if context.simulated {
        line.push_str("[simulated GPU] ");
    }
    let wall = total.wall_s;
    if wall.is_nan() || wall <= 0.0 {
        let _ = write!(
            line,
            "GPU {}: no utilization samples attributed yet",
            total.gpu
        );
        return line;
    }
    let idle = total.idle_total_s();
    let pct = |x: f64| format_percent(100.0 * x / wall);
    let rank = context
        .rank
        .as_ref()
        .map(|r| format!(" (rank {r})"))
        .unwrap_or_default();
    let _ = write!(
        line,
        "GPU {}{rank} idle {} of {}: ",
        total.gpu,
        pct(idle),
        format_duration(wall)
    );
    let causes: Vec<String> = CAUSE_NAMES
        .iter()
        .zip(&total.idle_s)
        .map(|(name, &s)| format!("{name} {}", pct(s)))
        .collect();
    line.push_str(&causes.join(", "));
    line.push_str(" -- ");

    let dominant = (0..NUM_CAUSES)
        .max_by(|&a, &b| total.idle_s[a].total_cmp(&total.idle_s[b]))
        .unwrap_or(CAUSE_OTHER);
    if idle < GPU_BOUND_IDLE_FRACTION * wall {
        let _ = write!(
            line,
            "GPU-bound: busy {}; the input pipeline and host keep up",
            pct(total.busy_s)
        );
        return line;
    }
    match dominant {
        CAUSE_IO => {
            let io = total.idle_s[CAUSE_IO];
            let synchronous = total.io_feeder_s > 0.5 * io;
            let who = if synchronous {
                "the training loop's own"
            } else {
                "workers'"
            };
            let mut parts = Vec::new();
            let mut reads = format!("{who} reads");
            if let Some(p99) = context.read_p99_s.filter(|p| p.is_finite() && *p >= 0.0) {
                // A stall is one sleep inside a read (the default mode), not the whole call.
                let what = if context.p99_of_stalls { " stall" } else { "" };
                let _ = write!(reads, "{what} p99 {}", format_latency(p99));
            }
            if let Some(dev) = &context.read_device {
                let _ = write!(reads, " on {dev}");
            }
            parts.push(reads);
            if let Some(path) = &context.hottest_path {
                parts.push(format!("hottest path {path}"));
            }
            if synchronous {
                parts.push("DataLoader workers (num_workers > 0) would overlap the reads".into());
            }
            let _ = write!(line, "storage-bound: {}", parts.join(", "));
        }
        CAUSE_PREPROCESS => line.push_str(
            "preprocessing-bound (CPU): DataLoader workers compute while the GPU waits; \
             add workers or make transforms cheaper",
        ),
        CAUSE_HOST => line.push_str(
            "host-bound (Python/launch overhead): the training loop is on CPU while the GPU \
             waits; larger batches, CUDA graphs or torch.compile cut it",
        ),
        _ => line.push_str(
            "other: the training loop waits on something other than input data \
             (collectives, synchronization, checkpoints, sleeps)",
        ),
    }
    line
}

/// `41%`, or one decimal below 1%.
pub fn format_percent(p: f64) -> String {
    if p > 0.0 && p < 0.95 {
        format!("{p:.1}%")
    } else {
        format!("{p:.0}%")
    }
}

/// `12.3s`, `10m12s`, `2h05m09s`.
pub fn format_duration(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "?".into();
    }
    if s < 60.0 {
        return format!("{s:.1}s");
    }
    let total = s.round() as u64;
    let (h, m, sec) = (total / 3600, total / 60 % 60, total % 60);
    if h > 0 {
        format!("{h}h{m:02}m{sec:02}s")
    } else {
        format!("{m}m{sec:02}s")
    }
}

/// `65 us`, `83 ms`, `1.2 s`.
fn format_latency(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.0} us", s * 1e6)
    } else if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.1} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(idle: [f64; 4], busy: f64, io_feeder: f64) -> GpuTotals {
        GpuTotals {
            gpu: 0,
            wall_s: busy + idle.iter().sum::<f64>(),
            busy_s: busy,
            idle_s: idle,
            io_feeder_s: io_feeder,
            samples: 1,
            dropped_samples: 0,
        }
    }

    #[test]
    fn verdicts_name_the_dominant_cause() {
        let ctx = VerdictContext {
            simulated: false,
            read_device: Some("vda".into()),
            read_p99_s: Some(0.083),
            hottest_path: Some("/data/train".into()),
            rank: None,
            p99_of_stalls: false,
        };
        // 612 s wall, 41% idle.
        let t = totals([201.96, 30.6, 12.24, 6.12], 361.08, 10.0);
        assert_eq!(
            verdict(&t, &ctx),
            "GPU 0 idle 41% of 10m12s: io 33%, preprocess 5%, host 2%, other 1% -- storage-bound: \
             workers' reads p99 83 ms on vda, hottest path /data/train"
        );
        let t = totals([80.0, 1.0, 1.0, 0.0], 18.0, 79.0);
        let v = verdict(&t, &VerdictContext::default());
        assert!(v.ends_with("storage-bound: the training loop's own reads, DataLoader workers (num_workers > 0) would overlap the reads"), "{v}");
        let t = totals([0.0, 50.0, 2.0, 0.3], 47.7, 0.0);
        let v = verdict(
            &t,
            &VerdictContext {
                simulated: true,
                ..ctx.clone()
            },
        );
        assert!(v.starts_with("[simulated GPU] GPU 0 idle 52% of 1m40s: io 0%, preprocess 50%, host 2%, other 0.3% -- preprocessing-bound (CPU)"), "{v}");
        let t = totals([1.0, 1.0, 30.0, 2.0], 66.0, 0.0);
        assert!(verdict(&t, &ctx).contains("-- host-bound (Python/launch overhead)"));
        let t = totals([1.0, 1.0, 2.0, 30.0], 66.0, 0.0);
        assert!(verdict(&t, &ctx).contains("-- other: "));
        let t = totals([5.0, 1.0, 2.0, 0.0], 92.0, 0.0);
        assert!(verdict(&t, &ctx).contains("-- GPU-bound: busy 92%"));
        let v = verdict(
            &totals([80.0, 1.0, 1.0, 0.0], 18.0, 0.0),
            &VerdictContext {
                rank: Some("3".into()),
                ..ctx.clone()
            },
        );
        assert!(v.starts_with("GPU 0 (rank 3) idle 82% of 1m40s"), "{v}");
        let v = verdict(
            &totals([80.0, 1.0, 1.0, 0.0], 18.0, 0.0),
            &VerdictContext {
                p99_of_stalls: true,
                ..ctx.clone()
            },
        );
        assert!(
            v.contains("storage-bound: workers' reads stall p99 83 ms on vda"),
            "{v}"
        );
        let t = GpuTotals::default();
        assert_eq!(
            verdict(&t, &ctx),
            "GPU 0: no utilization samples attributed yet"
        );
        assert_eq!(format_duration(7509.0), "2h05m09s");
        assert_eq!(format_duration(12.34), "12.3s");
        assert_eq!(format_latency(65e-6), "65 us");
        assert_eq!(format_latency(2.5), "2.5 s");
    }
}
