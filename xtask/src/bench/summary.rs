//! `target/bench/summary.json`: one typed schema, written and read back through the same types.
//! Reading it back is the first sanity check (every field present, of its type, no unknown
//! field, no NaN: a NaN is written as `null`, which does not read back as a number);
//! [`Summary::check`] does the rest (values that cannot be, programs that must or must not be
//! attached, goals consistent with the figures). Timing goals are reported, never asserted.
use std::{fs, path::Path};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::{
    Cfg, Rounds, Variant,
    bpf_stats::{self, BpfResults, ProgStats},
    e2e::E2eRun,
    fio::FioRun,
    median,
    self_cost::SCRAPES,
    syscall_loop::LoopRun,
    workloads::{CACHE_FILE_MIB, FIO_FILE_MIB},
};

/// Version of this schema (1 was the untyped one with `REQUIRED_KEYS`).
pub const SCHEMA_VERSION: u32 = 2;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    pub schema_version: u32,
    /// `cargo xtask bench` or `cargo xtask bench --quick`.
    pub command: String,
    pub quick: bool,
    pub date: String,
    pub environment: Environment,
    pub fio: Fio,
    pub syscall_loop: SyscallLoop,
    pub e2e: E2e,
    pub bpf_stats: BpfStats,
    pub self_cost: SelfCost,
    /// Every goal, measured, met or not (derived from the figures above).
    pub goals: Vec<Goal>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fact {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    pub machine: Vec<Fact>,
    pub loadavg_before: String,
    pub loadavg_after: String,
    pub bpf_stats_enabled_by_someone_else: bool,
    pub foreign_tracing_programs_max_seen: usize,
    pub waited_for_other_tracers_seconds: f64,
    pub elapsed_seconds: f64,
}

/// The rounds of one phase.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundsInfo {
    pub rounds: usize,
    /// Per round: the most tracing programs of other processes seen.
    pub foreign_tracing_programs: Vec<usize>,
    /// The rounds the medians and ratios are over.
    pub used: Vec<usize>,
}

/// One value per variant of the fio and syscall-loop phases.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Modes<T> {
    pub baseline: T,
    pub default_traced: T,
    pub default_untraced: T,
    pub syscalls_traced: T,
    pub syscalls_untraced: T,
    pub peer: T,
}

impl<T> Modes<T> {
    fn from_fn(mut f: impl FnMut(Variant) -> T) -> Self {
        Modes {
            baseline: f(Variant::Baseline),
            default_traced: f(Variant::DefaultTraced),
            default_untraced: f(Variant::DefaultUntraced),
            syscalls_traced: f(Variant::SyscallsTraced),
            syscalls_untraced: f(Variant::SyscallsUntraced),
            peer: f(Variant::Peer),
        }
    }

    pub fn get(&self, v: Variant) -> &T {
        match v {
            Variant::Baseline => &self.baseline,
            Variant::DefaultTraced => &self.default_traced,
            Variant::DefaultUntraced => &self.default_untraced,
            Variant::SyscallsTraced => &self.syscalls_traced,
            Variant::SyscallsUntraced => &self.syscalls_untraced,
            Variant::Peer => &self.peer,
        }
    }
}

/// One value per variant of the end-to-end phase.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct E2eModes<T> {
    pub baseline: T,
    pub default_traced: T,
    pub syscalls_traced: T,
}

impl<T> E2eModes<T> {
    fn from_fn(mut f: impl FnMut(Variant) -> T) -> Self {
        E2eModes {
            baseline: f(Variant::Baseline),
            default_traced: f(Variant::DefaultTraced),
            syscalls_traced: f(Variant::SyscallsTraced),
        }
    }

    pub fn get(&self, v: Variant) -> Option<&T> {
        match v {
            Variant::Baseline => Some(&self.baseline),
            Variant::DefaultTraced => Some(&self.default_traced),
            Variant::SyscallsTraced => Some(&self.syscalls_traced),
            _ => None,
        }
    }
}

/// One value per tracer variant (the bpf_stats phase).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracerModes<T> {
    pub default_traced: T,
    pub default_untraced: T,
    pub syscalls_traced: T,
    pub syscalls_untraced: T,
    pub peer: T,
}

impl<T> TracerModes<T> {
    pub fn get(&self, v: Variant) -> Option<&T> {
        match v {
            Variant::DefaultTraced => Some(&self.default_traced),
            Variant::DefaultUntraced => Some(&self.default_untraced),
            Variant::SyscallsTraced => Some(&self.syscalls_traced),
            Variant::SyscallsUntraced => Some(&self.syscalls_untraced),
            Variant::Peer => Some(&self.peer),
            Variant::Baseline => None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fio {
    pub runtime_seconds: u32,
    pub ramp_ms: u32,
    pub file_mib: u64,
    pub rounds: RoundsInfo,
    pub variants: Modes<FioVariant>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FioVariant {
    pub label: String,
    pub median_iops: f64,
    pub median_ns_per_io: f64,
    pub median_cpu_ns_per_io: f64,
    /// Median over the rounds used of `ns_per_io / baseline's - 1` (+0.01: 1% slower). None for
    /// the baseline.
    pub overhead_ratio: Option<f64>,
    /// The same on CPU time per I/O.
    pub cpu_overhead_ratio: Option<f64>,
    /// Per round used: the ratio (for the baseline, its spread around its median).
    pub ratio_per_round: Vec<f64>,
    /// Every run, index = round.
    pub runs: Vec<FioRun>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyscallLoop {
    pub reads_per_run: u64,
    pub file_mib: u64,
    pub rounds: RoundsInfo,
    pub variants: Modes<LoopVariant>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopVariant {
    pub label: String,
    pub median_ns_per_read: f64,
    pub median_cpu_ns_per_read: f64,
    /// As [`FioVariant::overhead_ratio`], on time per read.
    pub overhead_ratio: Option<f64>,
    pub cpu_overhead_ratio: Option<f64>,
    pub ratio_per_round: Vec<f64>,
    pub runs: Vec<LoopRun>,
}

/// trainloop.py's parameters in the end-to-end phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct E2eWorkload {
    pub workers: u32,
    pub files: u32,
    pub file_kib: u32,
    /// Samples (files) per batch.
    pub batch_files: u32,
    pub cpu_ms_per_file: f64,
    pub gpu_ms: f64,
    pub seconds: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct E2e {
    pub workload: E2eWorkload,
    pub rounds: RoundsInfo,
    pub variants: E2eModes<E2eVariant>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct E2eVariant {
    pub label: String,
    pub median_batches_per_second: f64,
    pub median_samples_per_second: f64,
    /// Median over the rounds used of `1 - samples/s / baseline's` (+0.01: 1% fewer samples per
    /// second). None for the baseline.
    pub throughput_loss_ratio: Option<f64>,
    /// Per round used: the loss (for the baseline, its spread around its median).
    pub loss_per_round: Vec<f64>,
    pub runs: Vec<E2eRun>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BpfStats {
    pub fio_runtime_seconds: u32,
    /// Read-family calls of the syscall loop (mix mode: read, pread64, readv, preadv, preadv2).
    pub loop_calls: u64,
    /// ns per run of an empty bpftrace program on `syscalls:sys_enter_read`.
    pub floor_ns_per_run: f64,
    pub variants: TracerModes<BpfVariant>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BpfVariant {
    pub label: String,
    pub fio_ios: u64,
    pub loop_calls: u64,
    /// Σ run_time_ns of the tracer's programs during fio / fio's I/Os.
    pub bpf_ns_per_fio_io: f64,
    /// Σ run_time_ns during the syscall loop / its read-family calls.
    pub bpf_ns_per_syscall: f64,
    /// Σ run_time_ns / Σ run_cnt over both workloads (None: no program ran).
    pub weighted_mean_ns_per_run: Option<f64>,
    pub fio_programs: ProgStats,
    pub loop_programs: ProgStats,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfCost {
    pub job_processes: usize,
    /// Sum of `stallmon_tracked_processes` on /metrics (None: the metric was missing).
    pub tracked_processes_metric: Option<f64>,
    pub interval_seconds: f64,
    /// utime+stime over the window / the window: share of one core.
    pub cpu_fraction: f64,
    pub cpu_window_seconds: f64,
    /// VmHWM after the scrapes.
    pub peak_rss_bytes: u64,
    pub rss_bytes: u64,
    pub scrape_median_seconds: f64,
    pub scrape_p99_seconds: f64,
    pub scrape_max_seconds: f64,
    pub scrape_body_bytes: u64,
    /// Every scrape, connect to last byte.
    pub scrape_seconds: Vec<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Goal {
    pub key: String,
    pub goal: String,
    pub measured: String,
    pub met: bool,
}

/// `Some(x)` for a number (`None` for NaN, which would not read back).
fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

impl Summary {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        cfg: &Cfg,
        date: String,
        environment: Environment,
        fio: Rounds<FioRun>,
        sys: Rounds<LoopRun>,
        e2e: Rounds<E2eRun>,
        stats: BpfResults,
        self_cost: SelfCost,
    ) -> Summary {
        let ratio = |x: f64, v: Variant| (v != Variant::Baseline).then_some(x).and_then(finite);
        let fio = Fio {
            runtime_seconds: cfg.fio_runtime_s,
            ramp_ms: cfg.fio_ramp_ms,
            file_mib: FIO_FILE_MIB,
            rounds: fio.info(),
            variants: Modes::from_fn(|v| {
                let per_round = fio.ratios(v, |r| r.ns_per_io);
                let cpu = fio.ratios(v, |r| r.cpu_ns_per_io);
                FioVariant {
                    label: v.label().into(),
                    median_iops: fio.median_of(v, |r| r.iops),
                    median_ns_per_io: fio.median_of(v, |r| r.ns_per_io),
                    median_cpu_ns_per_io: fio.median_of(v, |r| r.cpu_ns_per_io),
                    overhead_ratio: ratio(median(&per_round), v),
                    cpu_overhead_ratio: ratio(median(&cpu), v),
                    ratio_per_round: per_round,
                    runs: fio.all(v),
                }
            }),
        };
        let syscall_loop = SyscallLoop {
            reads_per_run: cfg.loop_reads,
            file_mib: CACHE_FILE_MIB,
            rounds: sys.info(),
            variants: Modes::from_fn(|v| {
                let per_round = sys.ratios(v, |r| r.ns_per_read);
                let cpu = sys.ratios(v, |r| r.cpu_ns_per_read);
                LoopVariant {
                    label: v.label().into(),
                    median_ns_per_read: sys.median_of(v, |r| r.ns_per_read),
                    median_cpu_ns_per_read: sys.median_of(v, |r| r.cpu_ns_per_read),
                    overhead_ratio: ratio(median(&per_round), v),
                    cpu_overhead_ratio: ratio(median(&cpu), v),
                    ratio_per_round: per_round,
                    runs: sys.all(v),
                }
            }),
        };
        let e2e = E2e {
            workload: E2eWorkload {
                seconds: cfg.e2e_seconds,
                ..super::e2e::WORKLOAD
            },
            rounds: e2e.info(),
            variants: E2eModes::from_fn(|v| {
                let loss: Vec<f64> = e2e
                    .ratios(v, |r| r.samples_per_second)
                    .into_iter()
                    .map(|x| -x)
                    .collect();
                E2eVariant {
                    label: v.label().into(),
                    median_batches_per_second: e2e.median_of(v, |r| r.batches_per_second),
                    median_samples_per_second: e2e.median_of(v, |r| r.samples_per_second),
                    throughput_loss_ratio: ratio(median(&loss), v),
                    loss_per_round: loss,
                    runs: e2e.all(v),
                }
            }),
        };
        let variant = |v: Variant| {
            let (_, r) = stats
                .variants
                .iter()
                .find(|(x, _)| *x == v)
                .expect("every tracer variant measured");
            BpfVariant {
                label: v.label().into(),
                fio_ios: r.fio_ios,
                loop_calls: r.loop_calls,
                bpf_ns_per_fio_io: bpf_stats::sum_ns(&r.fio) / r.fio_ios.max(1) as f64,
                bpf_ns_per_syscall: bpf_stats::sum_ns(&r.syscall_loop) / r.loop_calls.max(1) as f64,
                weighted_mean_ns_per_run: bpf_stats::weighted_mean(&bpf_stats::merge(
                    &r.fio,
                    &r.syscall_loop,
                )),
                fio_programs: r.fio.clone(),
                loop_programs: r.syscall_loop.clone(),
            }
        };
        let bpf_stats = BpfStats {
            fio_runtime_seconds: cfg.stats_fio_runtime_s,
            loop_calls: cfg.stats_loop_reads,
            floor_ns_per_run: stats.floor_ns,
            variants: TracerModes {
                default_traced: variant(Variant::DefaultTraced),
                default_untraced: variant(Variant::DefaultUntraced),
                syscalls_traced: variant(Variant::SyscallsTraced),
                syscalls_untraced: variant(Variant::SyscallsUntraced),
                peer: variant(Variant::Peer),
            },
        };
        let mut s = Summary {
            schema_version: SCHEMA_VERSION,
            command: cfg.command().into(),
            quick: cfg.quick,
            date,
            environment,
            fio,
            syscall_loop,
            e2e,
            bpf_stats,
            self_cost,
            goals: Vec::new(),
        };
        s.goals = s.compute_goals();
        s
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        fs::write(path, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Reads a summary back; a missing or mistyped field fails here, with the line it is on.
    pub fn read(path: &Path) -> Result<Summary> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("{} does not match the schema", path.display()))
    }

    pub fn parse(text: &str) -> Result<Summary> {
        serde_json::from_str(text).map_err(|e| {
            let line = text.lines().nth(e.line().saturating_sub(1)).unwrap_or("");
            anyhow!("{e} (line: {:?})", line.trim())
        })
    }

    /// Sanity, not timing goals: structure and values that cannot be.
    pub fn check(&self) -> Result<()> {
        let mut problems: Vec<String> = Vec::new();
        let mut need = |ok: bool, what: String| {
            if !ok {
                problems.push(what);
            }
        };
        let pos = |x: f64| x.is_finite() && x > 0.0;
        let ratio = |x: Option<f64>| x.is_some_and(|x| x.is_finite() && x > -1.0);
        need(
            self.schema_version == SCHEMA_VERSION,
            format!(
                "schema_version {} (want {SCHEMA_VERSION})",
                self.schema_version
            ),
        );
        let rounds_ok = |name: &str, r: &RoundsInfo, need: &mut dyn FnMut(bool, String)| {
            need(
                r.rounds > 0 && r.foreign_tracing_programs.len() == r.rounds,
                format!(
                    "{name}.rounds: {} rounds, {} foreign counts",
                    r.rounds,
                    r.foreign_tracing_programs.len()
                ),
            );
            need(
                !r.used.is_empty() && r.used.iter().all(|&u| u < r.rounds),
                format!("{name}.rounds.used: {:?} of {} rounds", r.used, r.rounds),
            );
        };
        rounds_ok("fio", &self.fio.rounds, &mut need);
        rounds_ok("syscall_loop", &self.syscall_loop.rounds, &mut need);
        rounds_ok("e2e", &self.e2e.rounds, &mut need);

        for v in Variant::ALL {
            let f = self.fio.variants.get(v);
            let at = format!("fio.variants.{}", v.key());
            need(
                f.runs.len() == self.fio.rounds.rounds,
                format!("{at}.runs: {} runs", f.runs.len()),
            );
            need(
                f.runs.iter().all(|r| {
                    pos(r.iops) && pos(r.ns_per_io) && r.ios > 0 && r.cpu_ns_per_io >= 0.0
                }),
                format!("{at}.runs: a run without I/O"),
            );
            need(
                pos(f.median_iops) && pos(f.median_ns_per_io),
                format!("{at}: medians"),
            );
            let l = self.syscall_loop.variants.get(v);
            let lat = format!("syscall_loop.variants.{}", v.key());
            need(
                l.runs.len() == self.syscall_loop.rounds.rounds,
                format!("{lat}.runs: {} runs", l.runs.len()),
            );
            need(
                l.runs.iter().all(|r| pos(r.ns_per_read)),
                format!("{lat}.runs: a run without reads"),
            );
            if v == Variant::Baseline {
                need(
                    f.overhead_ratio.is_none() && l.overhead_ratio.is_none(),
                    "baseline with an overhead".into(),
                );
            } else {
                need(
                    ratio(f.overhead_ratio) && ratio(f.cpu_overhead_ratio),
                    format!("{at}.overhead_ratio: not a ratio > -1"),
                );
                need(
                    ratio(l.overhead_ratio) && ratio(l.cpu_overhead_ratio),
                    format!("{lat}.overhead_ratio: not a ratio > -1"),
                );
            }
        }
        for v in Variant::E2E {
            let e = self.e2e.variants.get(v).expect("an e2e variant");
            let at = format!("e2e.variants.{}", v.key());
            need(
                e.runs.len() == self.e2e.rounds.rounds,
                format!("{at}.runs: {} runs", e.runs.len()),
            );
            need(
                e.runs
                    .iter()
                    .all(|r| r.batches > 0 && pos(r.samples_per_second)),
                format!("{at}.runs: a run without batches"),
            );
            if v != Variant::Baseline {
                need(
                    e.throughput_loss_ratio
                        .is_some_and(|x| x.is_finite() && x < 1.0),
                    format!("{at}.throughput_loss_ratio: not a ratio < 1"),
                );
            }
        }

        let b = &self.bpf_stats;
        need(
            pos(b.floor_ns_per_run),
            "bpf_stats.floor_ns_per_run: not positive".into(),
        );
        for v in Variant::TRACERS {
            let s = b.variants.get(v).expect("a tracer variant");
            let at = format!("bpf_stats.variants.{}", v.key());
            need(
                s.fio_ios > 0 && s.loop_calls > 0,
                format!("{at}: no I/O or no calls"),
            );
            need(
                pos(s.bpf_ns_per_fio_io),
                format!("{at}.bpf_ns_per_fio_io: not positive"),
            );
            need(
                s.bpf_ns_per_syscall >= 0.0,
                format!("{at}.bpf_ns_per_syscall: negative"),
            );
            need(
                s.fio_programs.values().any(|c| c.run_cnt > 0),
                format!("{at}.fio_programs: no program ran during fio"),
            );
            need(
                s.fio_programs
                    .values()
                    .chain(s.loop_programs.values())
                    .all(|c| c.ns_per_run().is_none_or(pos)),
                format!("{at}: a program with runs but no run time"),
            );
            if let Some((syscalls, _)) = v.stallmon() {
                need(
                    s.weighted_mean_ns_per_run.is_some_and(pos),
                    format!("{at}.weighted_mean_ns_per_run"),
                );
                for tp in ["sys_enter", "sys_exit"] {
                    let ran = s.loop_programs.get(tp).is_some_and(|c| c.run_cnt > 0);
                    let attached =
                        s.loop_programs.contains_key(tp) || s.fio_programs.contains_key(tp);
                    if syscalls {
                        need(ran, format!("{at}: --syscalls without {tp} runs"));
                    } else {
                        need(
                            !attached,
                            format!("{at}: the default mode has {tp} attached"),
                        );
                    }
                }
                need(
                    s.fio_programs.contains_key("sched_switch")
                        && s.fio_programs.contains_key("block_rq_complete"),
                    format!("{at}: sched_switch or block_rq_complete not attached"),
                );
            }
        }

        let me = &self.self_cost;
        need(
            me.cpu_fraction.is_finite() && me.cpu_fraction >= 0.0,
            format!("self_cost.cpu_fraction: {}", me.cpu_fraction),
        );
        need(
            me.peak_rss_bytes > 0 && me.peak_rss_bytes >= me.rss_bytes,
            "self_cost.peak_rss_bytes".into(),
        );
        need(
            pos(me.scrape_p99_seconds) && me.scrape_seconds.len() == SCRAPES,
            "self_cost.scrape_*".into(),
        );
        need(
            me.scrape_body_bytes > 0,
            "self_cost.scrape_body_bytes: empty /metrics".into(),
        );
        need(
            me.tracked_processes_metric.is_some_and(|n| n >= 1.0),
            format!(
                "self_cost.tracked_processes_metric: {:?}",
                me.tracked_processes_metric
            ),
        );
        need(
            me.job_processes >= super::workloads::JOB_PROCESSES,
            "self_cost.job_processes".into(),
        );
        need(
            self.goals == self.compute_goals(),
            "goals do not follow from the figures".into(),
        );
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("{}", problems.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{bpf_stats::ProgCount, e2e::E2eRun};

    fn progs(names: &[&str]) -> ProgStats {
        names
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    ProgCount {
                        run_cnt: 1000,
                        run_time_ns: 150_000,
                    },
                )
            })
            .collect()
    }

    /// A plausible summary, built the way the benchmark builds it.
    fn sample() -> Summary {
        let cfg = Cfg::new(true);
        let mut fio = Rounds::new();
        let mut sys = Rounds::new();
        let mut e2e = Rounds::new();
        for r in 0..2 {
            for (i, v) in Variant::ALL.into_iter().enumerate() {
                let k = 1.0 + 0.01 * i as f64 + 0.001 * r as f64;
                fio.runs.entry(v.key()).or_default().push(FioRun {
                    iops: 8000.0 / k,
                    ns_per_io: 125_000.0 * k,
                    cpu_ns_per_io: 50_000.0 * k,
                    ios: 16000,
                });
                sys.runs.entry(v.key()).or_default().push(LoopRun {
                    ns_per_read: 1000.0 * k,
                    cpu_ns_per_read: 990.0 * k,
                });
            }
            for v in Variant::E2E {
                e2e.runs.entry(v.key()).or_default().push(E2eRun {
                    batches: 100,
                    wall_seconds: 3.0,
                    batches_per_second: 33.0,
                    samples_per_second: 33.0 * 32.0,
                });
            }
            fio.foreign.push(0);
            sys.foreign.push(0);
            e2e.foreign.push(0);
        }
        let base = [
            "sched_switch",
            "block_io_start",
            "block_rq_issue",
            "block_rq_complete",
        ];
        let with_sys = [&base[..], &["sys_enter", "sys_exit"]].concat();
        let variants = Variant::TRACERS
            .into_iter()
            .map(|v| {
                let names: &[&str] = match v.stallmon() {
                    Some((true, _)) => &with_sys,
                    Some((false, _)) => &base,
                    None => &["block_rq_issue", "block_rq_complete"],
                };
                let run = bpf_stats::BpfRun {
                    fio: progs(names),
                    fio_ios: 8000,
                    syscall_loop: progs(names),
                    loop_calls: 400_000,
                };
                (v, run)
            })
            .collect();
        let me = SelfCost {
            job_processes: 64,
            tracked_processes_metric: Some(64.0),
            interval_seconds: 1.0,
            cpu_fraction: 0.003,
            cpu_window_seconds: 6.0,
            peak_rss_bytes: 20 << 20,
            rss_bytes: 10 << 20,
            scrape_median_seconds: 0.001,
            scrape_p99_seconds: 0.003,
            scrape_max_seconds: 0.004,
            scrape_body_bytes: 40000,
            scrape_seconds: vec![0.001; SCRAPES],
        };
        Summary::build(
            &cfg,
            "2026-01-01 00:00 UTC".into(),
            Environment::default(),
            fio,
            sys,
            e2e,
            BpfResults {
                variants,
                floor_ns: 70.0,
            },
            me,
        )
    }

    #[test]
    fn a_sane_summary_round_trips_and_passes() {
        let s = sample();
        s.check().unwrap();
        let text = serde_json::to_string_pretty(&s).unwrap();
        // serde_json's float parsing may be 1 ULP off: read back, then sane again.
        let back = Summary::parse(&text).unwrap();
        back.check().unwrap();
        assert_eq!(back.goals, s.goals);
        assert_eq!(back.bpf_stats, s.bpf_stats);
        let fio = &s.fio.variants;
        assert!((fio.default_traced.overhead_ratio.unwrap() - 0.01).abs() < 1e-4);
        assert_eq!(fio.baseline.overhead_ratio, None);
        assert_eq!(
            s.bpf_stats.variants.default_traced.weighted_mean_ns_per_run,
            Some(150.0)
        );
        assert_eq!(s.goals.len(), 13);
    }

    #[test]
    fn missing_unknown_or_impossible_values_fail() {
        let s = sample();
        let v = serde_json::to_value(&s).unwrap();
        // A missing field, an unknown one, a NaN (written as null): reading back fails.
        let mut missing = v.clone();
        missing["self_cost"]
            .as_object_mut()
            .unwrap()
            .remove("scrape_p99_seconds");
        assert!(Summary::parse(&missing.to_string()).is_err());
        let mut unknown = v.clone();
        unknown["fio"]["median_probe"] = serde_json::json!(1);
        assert!(Summary::parse(&unknown.to_string()).is_err());
        let mut nan = v.clone();
        nan["self_cost"]["cpu_fraction"] = serde_json::Value::Null;
        assert!(Summary::parse(&nan.to_string()).is_err());

        let mut bad = s.clone();
        bad.fio.variants.default_traced.overhead_ratio = None; // was NaN
        assert!(bad.check().is_err());
        let mut bad = s.clone();
        bad.syscall_loop.variants.peer.overhead_ratio = Some(-1.5);
        assert!(bad.check().is_err());
        let mut bad = s.clone();
        bad.self_cost.cpu_fraction = -0.1;
        assert!(bad.check().is_err());
        let mut bad = s.clone();
        bad.bpf_stats
            .variants
            .default_untraced
            .loop_programs
            .insert("sys_enter".into(), ProgCount::default());
        assert!(
            bad.check().is_err(),
            "the default mode attaches no syscall tracepoint"
        );
        let mut bad = s.clone();
        bad.bpf_stats
            .variants
            .syscalls_traced
            .loop_programs
            .remove("sys_exit");
        assert!(bad.check().is_err());
        let mut bad = s.clone();
        bad.goals[0].met = !bad.goals[0].met;
        assert!(bad.check().is_err());
        let mut bad = s;
        bad.e2e.variants.default_traced.runs.pop();
        assert!(bad.check().is_err());
    }
}
