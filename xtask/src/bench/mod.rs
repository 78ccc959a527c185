//! `cargo xtask bench`: what stallmon costs, measured in one run, variants interleaved and
//! repeated, medians and ratios reported (docs/benchmarks.md, target/bench/summary.json).
//!
//! Phases, in this order:
//! 1. [`fio`]: 4 KiB random O_DIRECT reads (psync, QD1), IOPS and CPU time per I/O;
//! 2. [`syscall_loop`]: 4 KiB `read(2)` calls from the page cache (`xtask/bench/readloop.c`);
//! 3. [`e2e`]: the bundled training-loop imitation (`tests/workloads/trainloop.py`, 4 workers,
//!    page-cache data, CPU decoding, many small reads), in samples per second.
//!
//!    Phases 1 and 2 run every [`Variant`]: no tracer; stallmon in its default mode tracing the
//!    workload, and tracing an unrelated process; the same two with `--syscalls`; the peer
//!    (bpftrace with `xtask/bench/biolatency.bt`). Phase 3 runs no tracer, default mode and
//!    `--syscalls`, each tracing the job.
//! 4. [`bpf_stats`]: the kernel's own counters (run_time_ns / run_cnt per program) for every
//!    tracer variant, BPF time per I/O and per syscall. Apart from 1-3, so that the counters' own
//!    cost is not in their ratios.
//! 5. [`self_cost`]: stallmon's CPU share and peak RSS while tracing a 64-process job, /metrics
//!    scrape latency.
//!
//! The method (here, [`Bench::interleaved`]): each round runs every variant once, in an order
//! rotated from round to round; a variant's ratio is taken per round against the same round's
//! baseline, and the median over rounds is reported. Rounds during which another process had
//! tracing programs attached are left out (when at least two clean rounds remain).
//!
//! [`summary`] is the one typed schema of `target/bench/summary.json`, written and read back
//! through the same types; [`report`] renders docs/benchmarks.md from it alone. Every process
//! started here is killed, with its descendants, when its guard is dropped ([`workloads`]).
mod bpf_stats;
mod e2e;
mod fio;
mod goals;
mod machine;
mod report;
mod self_cost;
mod summary;
mod syscall_loop;
mod workloads;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use self::summary::{Environment, RoundsInfo, Summary};

/// Run lengths: `--quick` (CI's smoke test: same structure, fewer and shorter rounds) or full.
pub struct Cfg {
    pub quick: bool,
    pub fio_rounds: usize,
    pub fio_runtime_s: u32,
    pub fio_ramp_ms: u32,
    pub loop_rounds: usize,
    pub loop_reads: u64,
    pub e2e_rounds: usize,
    pub e2e_seconds: f64,
    pub stats_fio_runtime_s: u32,
    pub stats_loop_reads: u64,
    pub self_secs: u64,
}

impl Cfg {
    fn new(quick: bool) -> Self {
        if quick {
            Cfg {
                quick,
                fio_rounds: 2,
                fio_runtime_s: 2,
                fio_ramp_ms: 300,
                loop_rounds: 2,
                loop_reads: 400_000,
                e2e_rounds: 2,
                e2e_seconds: 3.0,
                stats_fio_runtime_s: 2,
                stats_loop_reads: 400_000,
                self_secs: 6,
            }
        } else {
            Cfg {
                quick,
                fio_rounds: 7,
                fio_runtime_s: 3,
                fio_ramp_ms: 500,
                loop_rounds: 7,
                loop_reads: 1_000_000,
                e2e_rounds: 5,
                e2e_seconds: 8.0,
                stats_fio_runtime_s: 4,
                stats_loop_reads: 1_000_000,
                self_secs: 30,
            }
        }
    }

    pub fn command(&self) -> &'static str {
        if self.quick {
            "cargo xtask bench --quick"
        } else {
            "cargo xtask bench"
        }
    }
}

/// What runs next to the workload.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Variant {
    /// No tracer.
    Baseline,
    /// `stallmon trace` (default mode: no syscall tracepoint) with the workload as its job.
    DefaultTraced,
    /// `stallmon trace --pid <a sleep>` while the workload runs untraced.
    DefaultUntraced,
    /// `stallmon trace --syscalls` with the workload as its job.
    SyscallsTraced,
    /// `stallmon trace --syscalls --pid <a sleep>` while the workload runs untraced.
    SyscallsUntraced,
    /// bpftrace with `xtask/bench/biolatency.bt`.
    Peer,
}

impl Variant {
    /// The variants of the fio and syscall-loop phases.
    pub const ALL: [Variant; 6] = [
        Variant::Baseline,
        Variant::DefaultTraced,
        Variant::DefaultUntraced,
        Variant::SyscallsTraced,
        Variant::SyscallsUntraced,
        Variant::Peer,
    ];
    /// The variants of the end-to-end phase.
    pub const E2E: [Variant; 3] = [
        Variant::Baseline,
        Variant::DefaultTraced,
        Variant::SyscallsTraced,
    ];
    /// Every variant with a tracer (the bpf_stats phase).
    pub const TRACERS: [Variant; 5] = [
        Variant::DefaultTraced,
        Variant::DefaultUntraced,
        Variant::SyscallsTraced,
        Variant::SyscallsUntraced,
        Variant::Peer,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Variant::Baseline => "baseline",
            Variant::DefaultTraced => "default_traced",
            Variant::DefaultUntraced => "default_untraced",
            Variant::SyscallsTraced => "syscalls_traced",
            Variant::SyscallsUntraced => "syscalls_untraced",
            Variant::Peer => "peer",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Variant::Baseline => "(a) no tracer",
            Variant::DefaultTraced => "(b) stallmon, default mode, tracing the workload",
            Variant::DefaultUntraced => "(c) stallmon, default mode, tracing an unrelated process",
            Variant::SyscallsTraced => "(d) stallmon --syscalls, tracing the workload",
            Variant::SyscallsUntraced => "(e) stallmon --syscalls, tracing an unrelated process",
            Variant::Peer => "(f) peer: bpftrace biolatency.bt",
        }
    }

    /// For stallmon's variants: (`--syscalls`, the workload is the traced job).
    pub fn stallmon(self) -> Option<(bool, bool)> {
        match self {
            Variant::DefaultTraced => Some((false, true)),
            Variant::DefaultUntraced => Some((false, false)),
            Variant::SyscallsTraced => Some((true, true)),
            Variant::SyscallsUntraced => Some((true, false)),
            Variant::Baseline | Variant::Peer => None,
        }
    }
}

/// Every run of every variant, by round, and the other tracers seen in each round.
pub struct Rounds<T> {
    runs: BTreeMap<&'static str, Vec<T>>,
    /// Per round: the most tracing programs of other processes seen before any of its runs.
    pub foreign: Vec<usize>,
}

impl<T: Clone> Rounds<T> {
    fn new() -> Self {
        Rounds {
            runs: BTreeMap::new(),
            foreign: Vec::new(),
        }
    }

    /// The rounds that count: those without other tracers if there are at least two, else all
    /// (a syscall tracepoint of anyone slows every syscall on the machine, baseline included).
    pub fn used(&self) -> Vec<usize> {
        let clean = self.foreign.iter().filter(|&&n| n == 0).count() >= 2;
        (0..self.foreign.len())
            .filter(|&r| !clean || self.foreign[r] == 0)
            .collect()
    }

    pub fn info(&self) -> RoundsInfo {
        RoundsInfo {
            rounds: self.foreign.len(),
            foreign_tracing_programs: self.foreign.clone(),
            used: self.used(),
        }
    }

    /// Every run of `v` (all rounds, index = round).
    pub fn all(&self, v: Variant) -> Vec<T> {
        self.runs.get(v.key()).cloned().unwrap_or_default()
    }

    /// The runs of `v` in the rounds that count.
    pub fn get(&self, v: Variant) -> Vec<T> {
        let all = self.all(v);
        self.used()
            .into_iter()
            .filter_map(|r| all.get(r).cloned())
            .collect()
    }

    /// Per-round `f(variant) / f(baseline) - 1` over the rounds that count; for the baseline
    /// itself, its spread around its median (the noise floor).
    pub fn ratios(&self, v: Variant, f: impl Fn(&T) -> f64) -> Vec<f64> {
        let base: Vec<f64> = self.get(Variant::Baseline).iter().map(&f).collect();
        if v == Variant::Baseline {
            let m = median(&base);
            return base.iter().map(|x| x / m - 1.0).collect();
        }
        self.get(v)
            .iter()
            .zip(base)
            .map(|(x, b)| f(x) / b - 1.0)
            .collect()
    }

    /// Median over the rounds that count of `f` of `v`'s runs.
    pub fn median_of(&self, v: Variant, f: impl Fn(&T) -> f64) -> f64 {
        median(&self.get(v).iter().map(f).collect::<Vec<_>>())
    }
}

/// The benchmark's paths and its bookkeeping of other tracers.
pub struct Bench {
    pub cfg: Cfg,
    pub dir: PathBuf,
    pub readloop: PathBuf,
    pub fio_file: PathBuf,
    pub cache_file: PathBuf,
    pub bt_script: PathBuf,
    /// Time left for waiting until other tracers are gone, and time spent waiting.
    wait_budget: Duration,
    waited: Duration,
    /// Most tracing programs of other processes seen when a run started anyway.
    foreign_seen: usize,
}

pub fn bench(quick: bool) -> Result<()> {
    let started = Instant::now();
    let root = ::tests::repo_root();
    let stallmon = crate::target_dir().join("release/stallmon");
    anyhow::ensure!(
        stallmon.is_file(),
        "{} is missing (cargo xtask bench builds it first)",
        stallmon.display()
    );
    // tests::Tracer starts $STALLMON_BIN. SAFETY: no other thread exists yet.
    unsafe { std::env::set_var("STALLMON_BIN", &stallmon) };
    let dir = crate::target_dir().join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut b = Bench {
        cfg: Cfg::new(quick),
        readloop: dir.join("readloop"),
        fio_file: dir.join("fio.dat"),
        cache_file: dir.join("cache.dat"),
        bt_script: root.join("xtask/bench/biolatency.bt"),
        dir,
        wait_budget: Duration::from_secs(if quick { 15 } else { 240 }),
        waited: Duration::ZERO,
        foreign_seen: 0,
    };
    b.prepare(&root)?;
    let machine = machine::describe(&b.fio_file);
    let stats_on_before = bpf_stats::enabled();
    let load_before = machine::loadavg();
    let at = || started.elapsed().as_secs_f64();

    eprintln!("bench: phase 1/5: fio, {} rounds", b.cfg.fio_rounds);
    let fio = b.phase_fio()?;
    eprintln!(
        "bench: phase 2/5: syscall loop, {} rounds (at {:.0} s)",
        b.cfg.loop_rounds,
        at()
    );
    let sys = b.phase_loop()?;
    eprintln!(
        "bench: phase 3/5: end to end, trainloop.py, {} rounds (at {:.0} s)",
        b.cfg.e2e_rounds,
        at()
    );
    let e2e = b.phase_e2e()?;
    eprintln!("bench: phase 4/5: bpf_stats (at {:.0} s)", at());
    let stats = b.phase_bpf_stats()?;
    eprintln!(
        "bench: phase 5/5: stallmon itself, {}-process job, {} scrapes (at {:.0} s)",
        workloads::JOB_PROCESSES,
        self_cost::SCRAPES,
        at()
    );
    let me = b.phase_self()?;

    let env = Environment {
        machine,
        loadavg_before: load_before,
        loadavg_after: machine::loadavg(),
        bpf_stats_enabled_by_someone_else: stats_on_before,
        foreign_tracing_programs_max_seen: b.foreign_seen,
        waited_for_other_tracers_seconds: b.waited.as_secs_f64(),
        elapsed_seconds: at(),
    };
    let summary = Summary::build(&b.cfg, machine::date_utc(), env, fio, sys, e2e, stats, me);
    let summary_path = b.dir.join("summary.json");
    summary.write(&summary_path)?;
    let doc = report::render(&summary);
    let doc_path = root.join("docs/benchmarks.md");
    fs::write(&doc_path, &doc).with_context(|| format!("writing {}", doc_path.display()))?;
    println!("{}", report::results(&summary));
    println!("{}", report::goals_table(&summary));
    eprintln!(
        "bench: wrote {} and {} in {:.0} s",
        doc_path.display(),
        summary_path.display(),
        summary.environment.elapsed_seconds
    );

    // Sanity (not timing goals): read back what was written, through the same types.
    Summary::read(&summary_path)?
        .check()
        .context("summary.json failed the sanity check")
}

impl Bench {
    fn prepare(&mut self, root: &Path) -> Result<()> {
        for tool in ["fio", "bpftrace", "bpftool", "cc", "python3", "sh", "sleep"] {
            let ok = std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool} >/dev/null 2>&1")])
                .status()
                .is_ok_and(|s| s.success());
            anyhow::ensure!(
                ok,
                "{tool} is not installed (cargo xtask setup installs it)"
            );
        }
        anyhow::ensure!(
            self.bt_script.is_file(),
            "{} is missing",
            self.bt_script.display()
        );
        crate::demo::require_root("cargo xtask bench")?;
        crate::run(
            std::process::Command::new("cc")
                .args(["-O2", "-Wall", "-o"])
                .arg(&self.readloop)
                .arg(root.join("xtask/bench/readloop.c")),
        )
        .context("compiling xtask/bench/readloop.c")?;
        workloads::make_file(&self.fio_file, workloads::FIO_FILE_MIB)?;
        workloads::make_file(&self.cache_file, workloads::CACHE_FILE_MIB)?;
        self.prepare_e2e()
    }

    /// Waits (within the run's waiting budget) until no other process has tracing programs
    /// attached, and returns how many are left. Programs of our own tracers that just exited
    /// vanish within milliseconds.
    fn wait_quiet(&mut self) -> usize {
        let mut last = Instant::now();
        loop {
            let n = bpf_stats::foreign_tracing_programs().unwrap_or(0);
            if n == 0 || self.wait_budget.is_zero() {
                if n > 0 {
                    self.foreign_seen = self.foreign_seen.max(n);
                }
                return n;
            }
            thread::sleep(Duration::from_millis(250));
            let now = Instant::now();
            self.wait_budget = self.wait_budget.saturating_sub(now - last);
            self.waited += now - last;
            last = now;
        }
    }

    /// The method: `rounds` rounds, each running every one of `variants` once (`once(self,
    /// variant, round)`), in an order rotated from round to round, `pause` between runs; each
    /// run is logged with `show`.
    fn interleaved<T: Clone>(
        &mut self,
        phase: &str,
        variants: &[Variant],
        rounds: usize,
        pause: Duration,
        mut once: impl FnMut(&mut Self, Variant, usize) -> Result<T>,
        show: impl Fn(&T) -> String,
    ) -> Result<Rounds<T>> {
        let mut out = Rounds::new();
        for r in 0..rounds {
            let mut foreign = 0;
            for i in 0..variants.len() {
                let v = variants[(i + r) % variants.len()];
                foreign = foreign.max(self.wait_quiet());
                let run = once(self, v, r).with_context(|| format!("{phase}, {}", v.key()))?;
                eprintln!(
                    "bench:   {phase} round {}/{rounds} {:<18} {}",
                    r + 1,
                    v.key(),
                    show(&run)
                );
                out.runs.entry(v.key()).or_default().push(run);
                thread::sleep(pause);
            }
            out.foreign.push(foreign.max(self.wait_quiet()));
        }
        Ok(out)
    }
}

// Statistics.

pub fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile, `q` in (0, 1].
pub fn percentile(xs: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

pub fn min_max(xs: &[f64]) -> (f64, f64) {
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let xs: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&xs, 0.99), 198.0);
        assert_eq!(percentile(&xs, 0.5), 100.0);
    }

    #[test]
    fn rounds_ratios_and_clean_rounds() {
        let mut r: Rounds<f64> = Rounds::new();
        for (base, traced, foreign) in [(100.0, 110.0, 0), (200.0, 210.0, 3), (100.0, 102.0, 0)] {
            r.runs.entry("baseline").or_default().push(base);
            r.runs.entry("default_traced").or_default().push(traced);
            r.foreign.push(foreign);
        }
        // Round 1 had another tracer: left out.
        assert_eq!(r.used(), vec![0, 2]);
        let ratios = r.ratios(Variant::DefaultTraced, |x| *x);
        assert!((ratios[0] - 0.10).abs() < 1e-12 && (ratios[1] - 0.02).abs() < 1e-12);
        assert_eq!(r.ratios(Variant::Baseline, |x| *x), vec![0.0, 0.0]);
        assert_eq!(r.all(Variant::DefaultTraced).len(), 3);
        // Fewer than two clean rounds: all count.
        r.foreign = vec![1, 1, 0];
        assert_eq!(r.used(), vec![0, 1, 2]);
    }
}
