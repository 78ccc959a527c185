//! The goals of the benchmark (reported in the summary and the page, never asserted): each
//! derived from the summary's figures, so that a summary read back can be checked against them.
use super::summary::{Goal, Summary};

// Goals (reported, never asserted).
pub const GOAL_LOOP_UNTRACED: f64 = 0.01;
pub const GOAL_LOOP_TRACED: f64 = 0.10;
pub const GOAL_FIO_UNTRACED: f64 = 0.01;
pub const GOAL_FIO_TRACED: f64 = 0.02;
pub const GOAL_BPF_NS_PER_IO_UNTRACED: f64 = 600.0;
pub const GOAL_E2E_DEFAULT_LOSS: f64 = 0.01;
pub const GOAL_E2E_SYSCALLS_LOSS: f64 = 0.03;
pub const GOAL_WEIGHTED_NS: f64 = 150.0;
pub const GOAL_CPU_FRACTION: f64 = 0.01;
pub const GOAL_RSS_BYTES: f64 = 40.0 * 1024.0 * 1024.0;
pub const GOAL_SCRAPE_P99_S: f64 = 0.005;

/// `Some(x)` for a number (`None` for NaN).
fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

fn pct(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |x| format!("{:+.2}%", x * 100.0 + 0.0))
}

impl Summary {
    /// The goals, from the figures.
    pub fn compute_goals(&self) -> Vec<Goal> {
        let lv = &self.syscall_loop.variants;
        let fv = &self.fio.variants;
        let bv = &self.bpf_stats.variants;
        let ev = &self.e2e.variants;
        let me = &self.self_cost;
        let le = |x: Option<f64>, limit: f64| x.is_some_and(|x| x <= limit);
        let below = |a: Option<f64>, b: Option<f64>| matches!((a, b), (Some(a), Some(b)) if a < b);
        let ns = |x: Option<f64>| x.map_or("n/a".into(), |x| format!("{x:.0} ns"));
        let (io_traced, io_peer) = (
            finite(bv.default_traced.bpf_ns_per_fio_io),
            finite(bv.peer.bpf_ns_per_fio_io),
        );
        let io_untraced = finite(bv.default_untraced.bpf_ns_per_fio_io);
        let weighted = bv.default_traced.weighted_mean_ns_per_run.and_then(finite);
        let goal = |key: &str, goal: &str, measured: String, met: bool| Goal {
            key: key.into(),
            goal: goal.into(),
            measured,
            met,
        };
        vec![
            goal(
                "syscall_loop_default_untraced",
                "syscall loop, default mode tracing an unrelated process: <= 1%",
                pct(lv.default_untraced.overhead_ratio),
                le(lv.default_untraced.overhead_ratio, GOAL_LOOP_UNTRACED),
            ),
            goal(
                "syscall_loop_default_traced",
                "syscall loop, default mode tracing the loop: <= 10%",
                pct(lv.default_traced.overhead_ratio),
                le(lv.default_traced.overhead_ratio, GOAL_LOOP_TRACED),
            ),
            goal(
                "bpf_ns_per_io_default_untraced",
                "BPF time per fio I/O, default mode, fio untraced: <= 600 ns",
                ns(io_untraced),
                le(io_untraced, GOAL_BPF_NS_PER_IO_UNTRACED),
            ),
            goal(
                "bpf_ns_per_io_default_traced_vs_peer",
                "BPF time per fio I/O, default mode tracing fio: below the peer's",
                format!("{} vs {}", ns(io_traced), ns(io_peer)),
                below(io_traced, io_peer),
            ),
            goal(
                "fio_default_traced",
                "fio, default mode tracing fio: <= 2%",
                pct(fv.default_traced.overhead_ratio),
                le(fv.default_traced.overhead_ratio, GOAL_FIO_TRACED),
            ),
            goal(
                "fio_default_traced_vs_peer",
                "fio, default mode tracing fio: below the peer's",
                format!(
                    "{} vs {}",
                    pct(fv.default_traced.overhead_ratio),
                    pct(fv.peer.overhead_ratio)
                ),
                below(fv.default_traced.overhead_ratio, fv.peer.overhead_ratio),
            ),
            goal(
                "fio_default_untraced",
                "fio, default mode tracing an unrelated process: <= 1%",
                pct(fv.default_untraced.overhead_ratio),
                le(fv.default_untraced.overhead_ratio, GOAL_FIO_UNTRACED),
            ),
            goal(
                "e2e_default",
                "end to end, default mode: <= 1% fewer samples/s",
                pct(ev.default_traced.throughput_loss_ratio),
                le(
                    ev.default_traced.throughput_loss_ratio,
                    GOAL_E2E_DEFAULT_LOSS,
                ),
            ),
            goal(
                "e2e_syscalls",
                "end to end, --syscalls: <= 3% fewer samples/s",
                pct(ev.syscalls_traced.throughput_loss_ratio),
                le(
                    ev.syscalls_traced.throughput_loss_ratio,
                    GOAL_E2E_SYSCALLS_LOSS,
                ),
            ),
            goal(
                "bpf_weighted_mean_ns_per_run",
                "BPF time per program run, event-weighted mean, default mode tracing the job: <= 150 ns",
                ns(weighted),
                le(weighted, GOAL_WEIGHTED_NS),
            ),
            goal(
                "stallmon_cpu",
                "stallmon CPU, 64-process job: <= 1% of a core",
                format!("{:.2}%", me.cpu_fraction * 100.0),
                me.cpu_fraction <= GOAL_CPU_FRACTION,
            ),
            goal(
                "stallmon_peak_rss",
                "stallmon peak RSS <= 40 MiB",
                format!("{:.1} MiB", me.peak_rss_bytes as f64 / 1048576.0),
                me.peak_rss_bytes as f64 <= GOAL_RSS_BYTES,
            ),
            goal(
                "scrape_p99",
                "/metrics scrape p99 <= 5 ms",
                format!("{:.2} ms", me.scrape_p99_seconds * 1e3),
                me.scrape_p99_seconds <= GOAL_SCRAPE_P99_S,
            ),
        ]
    }
}
