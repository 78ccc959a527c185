//! `cargo xtask bench`: what stallmon costs, measured in one run, variants interleaved and
//! repeated, medians and ratios reported (docs/benchmarks.md, target/bench/summary.json).
//!
//! Phases:
//! 1. fio 4 KiB random O_DIRECT reads (psync, QD1) on a file: (a) no tracer, (b) stallmon
//!    tracing fio, (c) stallmon tracing an unrelated `sleep`, (d) the peer, bpftrace 0.17 with
//!    `xtask/bench/biolatency.bt`. IOPS and CPU time per I/O.
//! 2. A syscall-heavy loop (`xtask/bench/readloop.c`): 4 KiB reads from the page cache, no
//!    tracer / tracked / untracked.
//! 3. Exact probe cost from the kernel's own counters (bpf_stats: run_time_ns / run_cnt per
//!    program), stallmon (job tracked and not) and the peer. Run apart from phases 1 and 2 so
//!    that the counters' own cost is not in the overhead ratios.
//! 4. stallmon itself: CPU share and peak RSS while tracing a 64-process job, /metrics scrape
//!    latency over 200 scrapes.
//!
//! Every process started here is killed, with its descendants, when its guard is dropped.
use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::{fs::MetadataExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};

use crate::setup::repo_root;

/// Keys that `summary.json` must carry (CI's smoke test relies on them).
const REQUIRED_KEYS: &[&str] = &[
    "untracked_syscall_overhead_ratio",
    "tracked_syscall_overhead_ratio",
    "tracked_fio_overhead_ratio",
    "untracked_fio_overhead_ratio",
    "peer_fio_overhead_ratio",
    "probe_ns_per_event",
    "peer_probe_ns_per_event",
    "stallmon_cpu_fraction",
    "stallmon_peak_rss_bytes",
    "scrape_p99_seconds",
];

// Goals (reported, never asserted).
const GOAL_UNTRACKED_RATIO: f64 = 0.01;
const GOAL_TRACKED_FIO_RATIO: f64 = 0.02;
const GOAL_PROBE_NS: f64 = 100.0;
const GOAL_CPU_FRACTION: f64 = 0.01;
const GOAL_RSS_BYTES: f64 = 40.0 * 1024.0 * 1024.0;
const GOAL_SCRAPE_P99_S: f64 = 0.005;

/// The 64-process job of phase 4: a parent and 63 forked children, each reading 4 KiB from a
/// cached file every 50 ms; children leave when the parent is gone.
const JOB_PY: &str = r#"
import os, random, sys, time
path, n = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDONLY)
blocks = os.fstat(fd).st_size // 4096
root = os.getpid()
for _ in range(n - 1):
    if os.fork() == 0:
        break
rng = random.Random(os.getpid())
while True:
    os.pread(fd, 4096, rng.randrange(blocks) * 4096)
    time.sleep(0.05)
    if os.getpid() != root and os.getppid() != root:
        os._exit(0)
"#;

/// Runs "$@", writes its exit status to $1, then stays (as `sleep`) so that the tracer that
/// started it stays loaded until its counters have been read.
const HOLD_SH: &str = r#"done=$1; shift; "$@"; echo $? > "$done"; exec sleep 1000"#;

const JOB_PROCESSES: usize = 64;
const SCRAPES: usize = 200;
const FIO_FILE_MIB: u64 = 256;
const CACHE_FILE_MIB: u64 = 16;

struct Cfg {
    quick: bool,
    fio_rounds: usize,
    fio_runtime_s: u32,
    fio_ramp_ms: u32,
    sys_rounds: usize,
    sys_reads: u64,
    probe_fio_runtime_s: u32,
    self_secs: u64,
}

impl Cfg {
    fn new(quick: bool) -> Self {
        if quick {
            Cfg {
                quick,
                fio_rounds: 2,
                fio_runtime_s: 2,
                fio_ramp_ms: 500,
                sys_rounds: 3,
                sys_reads: 1_000_000,
                probe_fio_runtime_s: 2,
                self_secs: 8,
            }
        } else {
            Cfg {
                quick,
                fio_rounds: 10,
                fio_runtime_s: 3,
                fio_ramp_ms: 500,
                sys_rounds: 9,
                sys_reads: 2_000_000,
                probe_fio_runtime_s: 5,
                self_secs: 30,
            }
        }
    }

    fn command(&self) -> &'static str {
        if self.quick {
            "cargo xtask bench --quick"
        } else {
            "cargo xtask bench"
        }
    }
}

struct Bench {
    cfg: Cfg,
    dir: PathBuf,
    stallmon: PathBuf,
    readloop: PathBuf,
    fio_file: PathBuf,
    cache_file: PathBuf,
    bt_script: PathBuf,
    /// Time left for waiting until other tracers are gone, and time spent waiting.
    wait_budget: Duration,
    waited: Duration,
    /// Most tracing programs of other processes seen when a run started anyway.
    foreign_seen: usize,
}

pub fn bench(quick: bool) -> Result<()> {
    let started = Instant::now();
    let root = repo_root();
    let dir = root.join("target/bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut b = Bench {
        cfg: Cfg::new(quick),
        stallmon: root.join("target/release/stallmon"),
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
    let machine = machine_description(&b.fio_file);
    let stats_on_before = bpf_stats_enabled();
    let load_before = loadavg();

    eprintln!("bench: phase 1/4: fio, {} rounds", b.cfg.fio_rounds);
    let fio = b.phase_fio()?;
    eprintln!(
        "bench: phase 2/4: syscall loop, {} rounds (at {:.0} s)",
        b.cfg.sys_rounds,
        started.elapsed().as_secs_f64()
    );
    let sys = b.phase_syscalls()?;
    eprintln!(
        "bench: phase 3/4: probe cost, bpf_stats (at {:.0} s)",
        started.elapsed().as_secs_f64()
    );
    let probes = b.phase_probes()?;
    eprintln!(
        "bench: phase 4/4: stallmon itself, 64-process job, {SCRAPES} scrapes (at {:.0} s)",
        started.elapsed().as_secs_f64()
    );
    let me = b.phase_self()?;

    let env = EnvNotes {
        machine,
        date: date_utc(),
        load_before,
        load_after: loadavg(),
        stats_on_before,
        foreign_seen: b.foreign_seen,
        waited_s: b.waited.as_secs_f64(),
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    let summary = build_summary(&b.cfg, &env, &fio, &sys, &probes, &me);
    let summary_path = b.dir.join("summary.json");
    fs::write(
        &summary_path,
        serde_json::to_string_pretty(&summary)? + "\n",
    )
    .with_context(|| format!("writing {}", summary_path.display()))?;
    let doc = render_doc(&b.cfg, &env, &fio, &sys, &probes, &me, &summary);
    let doc_path = root.join("docs/benchmarks.md");
    fs::create_dir_all(root.join("docs"))?;
    fs::write(&doc_path, &doc).with_context(|| format!("writing {}", doc_path.display()))?;
    println!("{}", results_tables(&fio, &sys, &probes, &me, &summary));
    println!("{}", goals_table(&summary));
    eprintln!(
        "bench: wrote {} and {} in {:.0} s",
        doc_path.display(),
        summary_path.display(),
        env.elapsed_s
    );

    // Sanity (not timing goals): read back what was written and check it.
    let written: Value = serde_json::from_str(&fs::read_to_string(&summary_path)?)
        .context("summary.json is not valid JSON")?;
    check_summary(&written).context("summary.json failed the sanity check")
}

// ---------------------------------------------------------------------------------------------
// Preparation
// ---------------------------------------------------------------------------------------------

impl Bench {
    fn prepare(&mut self, root: &Path) -> Result<()> {
        if !self.stallmon.is_file() {
            bail!(
                "{} is missing (cargo xtask bench builds it first)",
                self.stallmon.display()
            );
        }
        for tool in ["fio", "bpftrace", "bpftool", "cc", "python3", "sh", "sleep"] {
            let ok = Command::new("sh")
                .args(["-c", &format!("command -v {tool} >/dev/null 2>&1")])
                .status()
                .is_ok_and(|s| s.success());
            ensure!(
                ok,
                "{tool} is not installed (cargo xtask setup installs it)"
            );
        }
        ensure!(
            self.bt_script.is_file(),
            "{} is missing",
            self.bt_script.display()
        );
        // SAFETY: plain getter.
        ensure!(
            unsafe { libc::geteuid() } == 0,
            "the benchmark must run as root"
        );
        let src = root.join("xtask/bench/readloop.c");
        crate::run(
            Command::new("cc")
                .args(["-O2", "-Wall", "-o"])
                .arg(&self.readloop)
                .arg(&src),
        )
        .context("compiling xtask/bench/readloop.c")?;
        make_file(&self.fio_file, FIO_FILE_MIB)?;
        make_file(&self.cache_file, CACHE_FILE_MIB)?;
        Ok(())
    }

    fn stallmon_cmd(&self) -> Command {
        let mut c = Command::new(&self.stallmon);
        c.args(["trace", "--listen", "127.0.0.1:0", "--no-gpu"]);
        c
    }

    /// Starts stallmon tracing `pid` and waits until it serves metrics.
    fn start_stallmon_pid(&self, pid: u32) -> Result<(Proc, SocketAddr)> {
        let mut c = self.stallmon_cmd();
        c.args(["--pid", &pid.to_string()]);
        let mut p = Proc::spawn(&mut c, "stallmon --pid", false)?;
        let addr = p.wait_ready(Duration::from_secs(60))?;
        Ok((p, addr))
    }

    /// Starts the peer and waits until both of its programs are attached.
    fn start_peer(&self) -> Result<Proc> {
        let mut c = Command::new("bpftrace");
        c.arg(&self.bt_script);
        start_bpftrace(&mut c, 2)
    }
}

/// Starts bpftrace and waits until `programs` of its programs are attached.
fn start_bpftrace(c: &mut Command, programs: usize) -> Result<Proc> {
    let mut p = Proc::spawn(c, "bpftrace", false)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attached = perf_show()
            .unwrap_or_default()
            .iter()
            .filter(|(pid, _, _)| *pid == p.pid())
            .count();
        if attached >= programs {
            return Ok(p);
        }
        if let Some(st) = p.child.try_wait()? {
            bail!(
                "bpftrace exited ({st}) before attaching: {}",
                p.stderr_tail()
            );
        }
        if Instant::now() > deadline {
            bail!("bpftrace did not attach in 60 s: {}", p.stderr_tail());
        }
        thread::sleep(Duration::from_millis(100));
    }
}

impl Bench {
    fn fio_args(&self, runtime_s: u32, ramp_ms: u32, out: &Path) -> Vec<String> {
        vec![
            "--name=stallmon-bench".into(),
            format!("--filename={}", self.fio_file.display()),
            format!("--size={FIO_FILE_MIB}M"),
            "--rw=randread".into(),
            "--bs=4k".into(),
            "--direct=1".into(),
            "--ioengine=psync".into(),
            "--iodepth=1".into(),
            "--numjobs=1".into(),
            "--time_based".into(),
            format!("--runtime={runtime_s}"),
            format!("--ramp_time={ramp_ms}ms"),
            "--output-format=json".into(),
            format!("--output={}", out.display()),
        ]
    }

    fn fio_timeout(runtime_s: u32) -> Duration {
        Duration::from_secs(runtime_s as u64 + 120)
    }

    /// Waits (within the run's waiting budget) until no other process has tracing programs
    /// attached, and returns how many are left. Programs of our own tracers that just exited
    /// vanish within milliseconds.
    fn wait_quiet(&mut self) -> usize {
        let mut last = Instant::now();
        loop {
            let n = foreign_tracing_programs().unwrap_or(0);
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
}

/// Creates `path` with `mib` MiB of non-zero data unless it already has that size.
fn make_file(path: &Path, mib: u64) -> Result<()> {
    let want = mib << 20;
    if fs::metadata(path).is_ok_and(|m| m.len() == want) {
        return Ok(());
    }
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for w in chunk.as_chunks_mut::<8>().0 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *w = x.to_le_bytes();
        }
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Phase 1: fio
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Baseline,
    Tracked,
    Untracked,
    Peer,
}

impl Variant {
    const FIO: [Variant; 4] = [
        Variant::Baseline,
        Variant::Tracked,
        Variant::Untracked,
        Variant::Peer,
    ];
    const SYSCALL: [Variant; 3] = [Variant::Baseline, Variant::Tracked, Variant::Untracked];

    fn key(self) -> &'static str {
        match self {
            Variant::Baseline => "baseline",
            Variant::Tracked => "tracked",
            Variant::Untracked => "untracked",
            Variant::Peer => "peer",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Variant::Baseline => "(a) no tracer",
            Variant::Tracked => "(b) stallmon tracing the workload",
            Variant::Untracked => "(c) stallmon tracing an unrelated process",
            Variant::Peer => "(d) peer: bpftrace 0.17 biolatency.bt",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct FioRun {
    iops: f64,
    /// Wall time per I/O (1 / IOPS), ns.
    ns_per_io: f64,
    cpu_ns_per_io: f64,
    ios: f64,
}

/// Per-variant runs, index = round, and whether other tracers were around in each round.
struct Rounds<T> {
    runs: BTreeMap<&'static str, Vec<T>>,
    /// Per round: the most tracing programs of other processes seen before any of its runs.
    foreign: Vec<usize>,
}

impl<T: Copy> Rounds<T> {
    fn new() -> Self {
        Rounds {
            runs: BTreeMap::new(),
            foreign: Vec::new(),
        }
    }

    fn push(&mut self, v: Variant, r: T) {
        self.runs.entry(v.key()).or_default().push(r);
    }

    fn end_round(&mut self, foreign: usize) {
        self.foreign.push(foreign);
    }

    fn clean_rounds(&self) -> usize {
        self.foreign.iter().filter(|&&n| n == 0).count()
    }

    /// The rounds that count: those without other tracers if there are at least two, else all
    /// (a syscall tracepoint of anyone slows every syscall on the machine, baseline included).
    fn used(&self) -> Vec<usize> {
        let clean = self.clean_rounds() >= 2;
        (0..self.foreign.len())
            .filter(|&r| !clean || self.foreign[r] == 0)
            .collect()
    }

    /// Every run of `v` (all rounds).
    fn all(&self, v: Variant) -> &[T] {
        self.runs.get(v.key()).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The runs of `v` in the rounds that count.
    fn get(&self, v: Variant) -> Vec<T> {
        let all = self.all(v);
        self.used()
            .into_iter()
            .filter_map(|r| all.get(r).copied())
            .collect()
    }

    /// Per-round ratios `f(variant) / f(baseline) - 1`, over the rounds that count.
    fn ratios(&self, v: Variant, f: impl Fn(&T) -> f64) -> Vec<f64> {
        self.get(v)
            .iter()
            .zip(self.get(Variant::Baseline))
            .map(|(x, base)| f(x) / f(&base) - 1.0)
            .collect()
    }
}

struct FioResults {
    rounds: Rounds<FioRun>,
}

impl Bench {
    fn phase_fio(&mut self) -> Result<FioResults> {
        // Warm-up (not counted): the device, the host's cache, fio's file layout.
        self.fio_once(Variant::Baseline, 1, 0, "warmup")?;
        let mut rounds = Rounds::new();
        for r in 0..self.cfg.fio_rounds {
            let mut foreign = 0;
            for i in 0..Variant::FIO.len() {
                let v = Variant::FIO[(i + r) % Variant::FIO.len()];
                foreign = foreign.max(self.wait_quiet());
                let run = self.fio_once(
                    v,
                    self.cfg.fio_runtime_s,
                    self.cfg.fio_ramp_ms,
                    &format!("{}-{r}", v.key()),
                )?;
                eprintln!(
                    "bench:   fio round {}/{} {:<9} {:>8.0} IOPS {:>6.2} us/IO, CPU {:>5.2} us/IO",
                    r + 1,
                    self.cfg.fio_rounds,
                    v.key(),
                    run.iops,
                    run.ns_per_io / 1e3,
                    run.cpu_ns_per_io / 1e3
                );
                rounds.push(v, run);
                thread::sleep(Duration::from_millis(300));
            }
            rounds.end_round(foreign.max(self.wait_quiet()));
        }
        Ok(FioResults { rounds })
    }

    fn fio_once(&self, v: Variant, runtime_s: u32, ramp_ms: u32, tag: &str) -> Result<FioRun> {
        let out = self.dir.join(format!("fio-{tag}.json"));
        let _ = fs::remove_file(&out);
        let args = self.fio_args(runtime_s, ramp_ms, &out);
        let timeout = Self::fio_timeout(runtime_s);
        match v {
            Variant::Baseline => {
                run_to_end(Command::new("fio").args(&args), "fio", timeout)?;
            }
            Variant::Tracked => {
                let mut c = self.stallmon_cmd();
                c.arg("--").arg("fio").args(&args);
                run_to_end(&mut c, "stallmon -- fio", timeout)?;
            }
            Variant::Untracked => {
                let sleep = Proc::spawn(Command::new("sleep").arg("1000"), "sleep", false)?;
                let (mut sm, _) = self.start_stallmon_pid(sleep.pid())?;
                run_to_end(Command::new("fio").args(&args), "fio", timeout)?;
                sm.stop_ok(libc::SIGINT)?;
            }
            Variant::Peer => {
                let mut bt = self.start_peer()?;
                run_to_end(Command::new("fio").args(&args), "fio", timeout)?;
                bt.stop_ok(libc::SIGINT)?;
            }
        }
        parse_fio(&out)
    }
}

fn parse_fio(path: &Path) -> Result<FioRun> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // fio may print warnings before the JSON document.
    let start = text
        .find('{')
        .ok_or_else(|| anyhow!("no JSON in {}", path.display()))?;
    let v: Value = serde_json::from_str(&text[start..])
        .with_context(|| format!("parsing {}", path.display()))?;
    let job = &v["jobs"][0];
    let num = |x: &Value, what: &str| {
        x.as_f64()
            .ok_or_else(|| anyhow!("fio output {} lacks {what}", path.display()))
    };
    let iops = num(&job["read"]["iops"], "read.iops")?;
    let ios = num(&job["read"]["total_ios"], "read.total_ios")?;
    let runtime_ms = num(&job["job_runtime"], "job_runtime")?;
    let cpu_pct = num(&job["usr_cpu"], "usr_cpu")? + num(&job["sys_cpu"], "sys_cpu")?;
    ensure!(
        iops > 0.0 && ios > 0.0 && runtime_ms > 0.0,
        "fio did no I/O ({})",
        path.display()
    );
    Ok(FioRun {
        iops,
        ns_per_io: 1e9 / iops,
        cpu_ns_per_io: cpu_pct / 100.0 * runtime_ms * 1e6 / ios,
        ios,
    })
}

// ---------------------------------------------------------------------------------------------
// Phase 2: syscall loop
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct LoopRun {
    ns_per_read: f64,
    cpu_ns_per_read: f64,
}

struct SysResults {
    rounds: Rounds<LoopRun>,
}

impl Bench {
    fn readloop_cmd(&self, mode: &str, reads: u64) -> Command {
        let mut c = Command::new(&self.readloop);
        c.arg(&self.cache_file).arg(reads.to_string()).arg(mode);
        c
    }

    fn phase_syscalls(&mut self) -> Result<SysResults> {
        let reads = self.cfg.sys_reads;
        // Warm-up: the file into the page cache, the binary into memory.
        self.loop_once(Variant::Baseline, reads / 4)?;
        let mut rounds = Rounds::new();
        for r in 0..self.cfg.sys_rounds {
            let mut foreign = 0;
            for i in 0..Variant::SYSCALL.len() {
                let v = Variant::SYSCALL[(i + r) % Variant::SYSCALL.len()];
                foreign = foreign.max(self.wait_quiet());
                let run = self.loop_once(v, reads)?;
                eprintln!(
                    "bench:   loop round {}/{} {:<9} {:>7.1} ns/read, CPU {:>7.1} ns/read",
                    r + 1,
                    self.cfg.sys_rounds,
                    v.key(),
                    run.ns_per_read,
                    run.cpu_ns_per_read
                );
                rounds.push(v, run);
                thread::sleep(Duration::from_millis(200));
            }
            rounds.end_round(foreign.max(self.wait_quiet()));
        }
        Ok(SysResults { rounds })
    }

    fn loop_once(&self, v: Variant, reads: u64) -> Result<LoopRun> {
        let timeout = Duration::from_secs(120);
        let out = match v {
            Variant::Baseline => {
                run_to_end(&mut self.readloop_cmd("read", reads), "readloop", timeout)?
            }
            Variant::Tracked => {
                let mut c = self.stallmon_cmd();
                c.arg("--").arg(&self.readloop).arg(&self.cache_file);
                c.args([reads.to_string().as_str(), "read"]);
                run_to_end(&mut c, "stallmon -- readloop", timeout)?
            }
            Variant::Untracked => {
                let sleep = Proc::spawn(Command::new("sleep").arg("1000"), "sleep", false)?;
                let (mut sm, _) = self.start_stallmon_pid(sleep.pid())?;
                let out = run_to_end(&mut self.readloop_cmd("read", reads), "readloop", timeout)?;
                sm.stop_ok(libc::SIGINT)?;
                out
            }
            Variant::Peer => bail!("no peer in the syscall loop"),
        };
        parse_readloop(&out)
    }
}

/// Parses `reads=N wall_ns=W cpu_ns=C`.
fn parse_readloop(out: &str) -> Result<LoopRun> {
    let line = out
        .lines()
        .find(|l| l.starts_with("reads="))
        .ok_or_else(|| anyhow!("readloop printed no result: {out:?}"))?;
    let mut kv = HashMap::new();
    for part in line.split_whitespace() {
        if let Some((k, v)) = part.split_once('=') {
            kv.insert(k, v.parse::<f64>().ok());
        }
    }
    let get = |k: &str| {
        kv.get(k)
            .copied()
            .flatten()
            .ok_or_else(|| anyhow!("readloop result lacks {k}: {line}"))
    };
    let (n, wall, cpu) = (get("reads")?, get("wall_ns")?, get("cpu_ns")?);
    ensure!(n > 0.0 && wall > 0.0, "readloop result is empty: {line}");
    Ok(LoopRun {
        ns_per_read: wall / n,
        cpu_ns_per_read: cpu / n,
    })
}

// ---------------------------------------------------------------------------------------------
// Phase 3: probe cost from bpf_stats
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Default, Debug)]
struct ProgCount {
    time_ns: u64,
    cnt: u64,
}

type ProgStats = BTreeMap<String, ProgCount>;

struct ProbeResults {
    /// stallmon, job tracked: fio under stallmon.
    tracked_fio: ProgStats,
    tracked_fio_ios: f64,
    /// stallmon, job tracked: readloop (every read-family syscall) under stallmon.
    tracked_loop: ProgStats,
    tracked_loop_reads: f64,
    /// stallmon tracing `sleep`; fio and readloop untracked.
    untracked_fio: ProgStats,
    untracked_fio_ios: f64,
    untracked_loop: ProgStats,
    untracked_loop_reads: f64,
    /// bpftrace with fio.
    peer_fio: ProgStats,
    peer_fio_ios: f64,
    /// ns per event of an empty bpftrace program on `syscalls:sys_enter_read`.
    floor_ns: f64,
}

impl Bench {
    fn phase_probes(&mut self) -> Result<ProbeResults> {
        let _stats = enable_bpf_stats()?;
        let rt = self.cfg.probe_fio_runtime_s;
        let reads = self.cfg.sys_reads;
        let fio_out = self.dir.join("fio-probes.json");

        // stallmon with the job tracked.
        let mut fio_cmd = vec!["fio".to_string()];
        fio_cmd.extend(self.fio_args(rt, self.cfg.fio_ramp_ms, &fio_out));
        let tracked_fio = self.held_job(&fio_cmd, Self::fio_timeout(rt))?;
        let tracked_fio_ios = parse_fio(&fio_out)?.ios;
        let loop_cmd = vec![
            self.readloop.display().to_string(),
            self.cache_file.display().to_string(),
            reads.to_string(),
            "mix".into(),
        ];
        let tracked_loop = self.held_job(&loop_cmd, Duration::from_secs(120))?;

        // stallmon tracing an unrelated process.
        let sleep = Proc::spawn(Command::new("sleep").arg("1000"), "sleep", false)?;
        let (mut sm, _) = self.start_stallmon_pid(sleep.pid())?;
        let s0 = prog_stats(sm.pid())?;
        run_to_end(
            Command::new("fio").args(self.fio_args(rt, self.cfg.fio_ramp_ms, &fio_out)),
            "fio",
            Self::fio_timeout(rt),
        )?;
        let s1 = prog_stats(sm.pid())?;
        let untracked_fio_ios = parse_fio(&fio_out)?.ios;
        run_to_end(
            &mut self.readloop_cmd("mix", reads),
            "readloop",
            Duration::from_secs(120),
        )?;
        let s2 = prog_stats(sm.pid())?;
        sm.stop_ok(libc::SIGINT)?;
        drop(sleep);

        // The peer.
        let mut bt = self.start_peer()?;
        let p0 = prog_stats(bt.pid())?;
        run_to_end(
            Command::new("fio").args(self.fio_args(rt, self.cfg.fio_ramp_ms, &fio_out)),
            "fio",
            Self::fio_timeout(rt),
        )?;
        let p1 = prog_stats(bt.pid())?;
        bt.stop_ok(libc::SIGINT)?;
        let peer_fio_ios = parse_fio(&fio_out)?.ios;

        // Calibration: what an empty program costs on this machine, the floor under every
        // number above (bpf_stats itself adds two clock reads per run).
        let mut cal = start_bpftrace(
            Command::new("bpftrace").args(["-e", "tracepoint:syscalls:sys_enter_read { }"]),
            1,
        )?;
        let c0 = prog_stats(cal.pid())?;
        run_to_end(
            &mut self.readloop_cmd("read", 200_000),
            "readloop",
            Duration::from_secs(60),
        )?;
        let c1 = prog_stats(cal.pid())?;
        cal.stop_ok(libc::SIGINT)?;
        let floor_ns = ns_per_event(&stats_delta(&c0, &c1))
            .into_values()
            .next()
            .unwrap_or(f64::NAN);

        Ok(ProbeResults {
            tracked_fio,
            tracked_fio_ios,
            tracked_loop,
            tracked_loop_reads: reads as f64,
            untracked_fio: stats_delta(&s0, &s1),
            untracked_fio_ios,
            untracked_loop: stats_delta(&s1, &s2),
            untracked_loop_reads: reads as f64,
            peer_fio: stats_delta(&p0, &p1),
            peer_fio_ios,
            floor_ns,
        })
    }

    /// Runs `argv` as a job started by stallmon, and returns stallmon's program counters from
    /// its start (metrics served) to the end of the command.
    fn held_job(&self, argv: &[String], timeout: Duration) -> Result<ProgStats> {
        let done = self.dir.join("job.done");
        let _ = fs::remove_file(&done);
        let mut c = self.stallmon_cmd();
        c.args(["--", "sh", "-c", HOLD_SH, "sh"])
            .arg(&done)
            .args(argv);
        let mut sm = Proc::spawn(&mut c, "stallmon -- job", false)?;
        sm.wait_ready(Duration::from_secs(60))?;
        let s0 = prog_stats(sm.pid())?;
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Ok(s) = fs::read_to_string(&done)
                && s.ends_with('\n')
            {
                break s.trim().to_string();
            }
            if let Some(st) = sm.child.try_wait()? {
                bail!("stallmon exited early ({st}): {}", sm.stderr_tail());
            }
            ensure!(
                Instant::now() < deadline,
                "{argv:?} under stallmon timed out"
            );
            thread::sleep(Duration::from_millis(50));
        };
        let s1 = prog_stats(sm.pid())?;
        // stallmon exits with its command's status: here the held `sleep`, terminated.
        sm.stop_any(libc::SIGINT)?;
        ensure!(
            status == "0",
            "{argv:?} under stallmon exited with {status}"
        );
        Ok(stats_delta(&s0, &s1))
    }
}

/// Holds bpf_stats on (run_time_ns / run_cnt per program) while alive.
enum StatsGuard {
    /// BPF_ENABLE_STATS: on until the descriptor is closed, even if we crash.
    Fd(#[allow(dead_code)] OwnedFd),
    /// Fallback: the sysctl, restored to its previous value on drop.
    Sysctl(String),
}

impl Drop for StatsGuard {
    fn drop(&mut self) {
        if let StatsGuard::Sysctl(prev) = self {
            let _ = fs::write("/proc/sys/kernel/bpf_stats_enabled", prev.as_bytes());
        }
    }
}

fn enable_bpf_stats() -> Result<StatsGuard> {
    const BPF_ENABLE_STATS: libc::c_long = 32;
    #[repr(C)]
    struct EnableStats {
        kind: u32, // BPF_STATS_RUN_TIME = 0
    }
    let attr = EnableStats { kind: 0 };
    // SAFETY: the bpf syscall with a valid attribute of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            &attr as *const EnableStats,
            std::mem::size_of::<EnableStats>() as libc::c_uint,
        )
    };
    if fd >= 0 {
        // SAFETY: a descriptor the kernel just returned to us.
        return Ok(StatsGuard::Fd(unsafe { OwnedFd::from_raw_fd(fd as i32) }));
    }
    let path = "/proc/sys/kernel/bpf_stats_enabled";
    let prev = fs::read_to_string(path).context("reading kernel.bpf_stats_enabled")?;
    fs::write(path, "1").context("setting kernel.bpf_stats_enabled=1")?;
    Ok(StatsGuard::Sysctl(prev.trim().to_string()))
}

fn bpf_stats_enabled() -> bool {
    fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1")
}

fn fdinfo(pid: u32, fd: &str) -> HashMap<String, String> {
    fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The kernel's counters of every BPF program that process `pid` holds, by attach point:
/// `/proc/PID/fdinfo` of its program descriptors (run_time_ns, run_cnt), named after the
/// tracepoint its link (or, for perf-event attachment, `bpftool perf`) points at.
fn prog_stats(pid: u32) -> Result<ProgStats> {
    let mut progs: BTreeMap<u32, ProgCount> = BTreeMap::new();
    let mut names: HashMap<u32, String> = HashMap::new();
    let fd_dir = format!("/proc/{pid}/fd");
    for e in fs::read_dir(&fd_dir).with_context(|| format!("listing {fd_dir}"))? {
        let e = e?;
        let Ok(target) = fs::read_link(e.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        let fd = e.file_name().to_string_lossy().into_owned();
        if target == "anon_inode:bpf-prog" {
            let info = fdinfo(pid, &fd);
            let num = |k: &str| info.get(k).and_then(|v| v.parse::<u64>().ok());
            if let Some(id) = num("prog_id") {
                progs.insert(
                    id as u32,
                    ProgCount {
                        time_ns: num("run_time_ns").unwrap_or(0),
                        cnt: num("run_cnt").unwrap_or(0),
                    },
                );
            }
        } else if target == "anon_inode:bpf_link" {
            let info = fdinfo(pid, &fd);
            if let (Some(id), Some(tp)) = (
                info.get("prog_id").and_then(|v| v.parse::<u32>().ok()),
                info.get("tp_name"),
            ) {
                names.insert(id, tp.clone());
            }
        }
    }
    if progs.keys().any(|id| !names.contains_key(id)) {
        for (p, id, tp) in perf_show().unwrap_or_default() {
            if p == pid {
                names.entry(id).or_insert(tp);
            }
        }
    }
    let mut out = ProgStats::new();
    for (id, c) in progs {
        let mut name = names.remove(&id).unwrap_or_else(|| format!("prog_{id}"));
        if out.contains_key(&name) {
            name = format!("{name}#{id}");
        }
        out.insert(name, c);
    }
    Ok(out)
}

/// `bpftool perf show`: (pid, prog_id, tracepoint) of perf-event and raw-tracepoint attachments.
fn perf_show() -> Result<Vec<(u32, u32, String)>> {
    let out = Command::new("bpftool")
        .args(["perf", "show", "-j"])
        .stderr(Stdio::null())
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e["pid"].as_u64()? as u32,
                e["prog_id"].as_u64()? as u32,
                e["tracepoint"].as_str()?.to_string(),
            ))
        })
        .collect())
}

/// Tracing programs attached by other processes (concurrent tracers skew every number).
fn foreign_tracing_programs() -> Option<usize> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        v.as_array()?
            .iter()
            .filter(|p| {
                matches!(
                    p["type"].as_str(),
                    Some("tracing" | "tracepoint" | "raw_tracepoint" | "kprobe" | "perf_event")
                )
            })
            .count(),
    )
}

fn stats_delta(a: &ProgStats, b: &ProgStats) -> ProgStats {
    b.iter()
        .map(|(k, v)| {
            let base = a.get(k).copied().unwrap_or_default();
            (
                k.clone(),
                ProgCount {
                    time_ns: v.time_ns.saturating_sub(base.time_ns),
                    cnt: v.cnt.saturating_sub(base.cnt),
                },
            )
        })
        .collect()
}

fn stats_merge(a: &ProgStats, b: &ProgStats) -> ProgStats {
    let mut out = a.clone();
    for (k, v) in b {
        let e = out.entry(k.clone()).or_default();
        e.time_ns += v.time_ns;
        e.cnt += v.cnt;
    }
    out
}

/// ns per event of every program that ran.
fn ns_per_event(s: &ProgStats) -> BTreeMap<String, f64> {
    s.iter()
        .filter(|(_, c)| c.cnt > 0)
        .map(|(k, c)| (k.clone(), c.time_ns as f64 / c.cnt as f64))
        .collect()
}

fn total_ns(s: &ProgStats) -> f64 {
    s.values().map(|c| c.time_ns as f64).sum()
}

fn total_cnt(s: &ProgStats) -> f64 {
    s.values().map(|c| c.cnt as f64).sum()
}

// ---------------------------------------------------------------------------------------------
// Phase 4: stallmon itself
// ---------------------------------------------------------------------------------------------

struct SelfResults {
    cpu_fraction: f64,
    window_s: f64,
    peak_rss_bytes: u64,
    rss_bytes: u64,
    job_processes: usize,
    tracked_processes: Option<f64>,
    scrape_s: Vec<f64>,
    scrape_bytes: usize,
}

impl Bench {
    fn phase_self(&mut self) -> Result<SelfResults> {
        let mut c = self.stallmon_cmd();
        c.args(["--", "python3", "-c", JOB_PY])
            .arg(&self.cache_file)
            .arg(JOB_PROCESSES.to_string());
        let mut sm = Proc::spawn(&mut c, "stallmon -- python3 job", false)?;
        let addr = sm.wait_ready(Duration::from_secs(60))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let job_processes = loop {
            let n = descendants(sm.pid()).len();
            if n >= JOB_PROCESSES {
                break n;
            }
            if let Some(st) = sm.child.try_wait()? {
                bail!("stallmon exited ({st}): {}", sm.stderr_tail());
            }
            ensure!(
                Instant::now() < deadline,
                "the {JOB_PROCESSES}-process job did not start (have {n})"
            );
            thread::sleep(Duration::from_millis(100));
        };
        // Let a snapshot or two pass, then measure a clean window (no scrapes in it).
        thread::sleep(Duration::from_millis(1500));
        let (t0, w0) = (cpu_ticks(sm.pid())?, Instant::now());
        thread::sleep(Duration::from_secs(self.cfg.self_secs));
        let (t1, window) = (cpu_ticks(sm.pid())?, w0.elapsed().as_secs_f64());
        // SAFETY: plain getter.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let cpu_fraction = (t1 - t0) as f64 / hz / window;

        let mut scrape_s = Vec::with_capacity(SCRAPES);
        let mut last_body = String::new();
        for _ in 0..SCRAPES {
            let (dt, body) = scrape(addr)?;
            scrape_s.push(dt.as_secs_f64());
            last_body = body;
            thread::sleep(Duration::from_millis(5));
        }
        let tracked_processes = tracked_processes(&last_body);
        let status = fs::read_to_string(format!("/proc/{}/status", sm.pid()))?;
        let kib = |key: &str| -> Option<u64> {
            status
                .lines()
                .find(|l| l.starts_with(key))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        let peak_rss_bytes = kib("VmHWM:").context("no VmHWM in /proc/PID/status")? * 1024;
        let rss_bytes = kib("VmRSS:").unwrap_or(0) * 1024;
        // stallmon exits with the job's status (terminated).
        sm.stop_any(libc::SIGINT)?;
        Ok(SelfResults {
            cpu_fraction,
            window_s: window,
            peak_rss_bytes,
            rss_bytes,
            job_processes,
            tracked_processes,
            scrape_s,
            scrape_bytes: last_body.len(),
        })
    }
}

/// The sum over roles of `stallmon_tracked_processes` in a /metrics body.
fn tracked_processes(body: &str) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with("stallmon_tracked_processes"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// utime + stime of a process (all its threads, dead ones included), in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("odd /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let utime: u64 = f.get(11).and_then(|s| s.parse().ok()).context("utime")?;
    let stime: u64 = f.get(12).and_then(|s| s.parse().ok()).context("stime")?;
    Ok(utime + stime)
}

/// One GET /metrics on a fresh connection (HTTP/1.0): time from connect to the last byte.
fn scrape(addr: SocketAddr) -> Result<(Duration, String)> {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let dt = t.elapsed();
    let text = String::from_utf8_lossy(&buf);
    let status = text.lines().next().unwrap_or("");
    ensure!(
        status.starts_with("HTTP/1.") && status.contains(" 200"),
        "scrape of http://{addr}/metrics answered {status:?}"
    );
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((dt, body))
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// A child process that is killed, with its descendants, when dropped. Its stderr is collected
/// (for error messages) and offered line by line.
struct Proc {
    child: Child,
    what: String,
    lines: mpsc::Receiver<String>,
    tail: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(cmd: &mut Command, what: &str, stdout: bool) -> Result<Proc> {
        cmd.stdin(Stdio::null())
            .stdout(if stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped());
        // SAFETY: async-signal-safe calls only. If we die, the child dies with us.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {what} ({cmd:?})"))?;
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        let tail = Arc::new(Mutex::new(Vec::new()));
        let t = tail.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut t) = t.lock() {
                    if t.len() >= 40 {
                        t.remove(0);
                    }
                    t.push(line.clone());
                }
                let _ = tx.send(line);
            }
        });
        Ok(Proc {
            child,
            what: what.to_string(),
            lines: rx,
            tail,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr_tail(&self) -> String {
        let t = self.tail.lock().map(|t| t.join("\n")).unwrap_or_default();
        if t.is_empty() {
            "(no stderr)".into()
        } else {
            format!("stderr:\n{t}")
        }
    }

    /// Waits for stallmon's `metrics on http://ADDR/metrics` line.
    fn wait_ready(&mut self, timeout: Duration) -> Result<SocketAddr> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(
                !left.is_zero(),
                "{} not ready after {timeout:?}: {}",
                self.what,
                self.stderr_tail()
            );
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(line) => {
                    if let Some((_, rest)) = line.split_once("metrics on http://") {
                        let addr = rest.trim_end().trim_end_matches("/metrics");
                        return addr
                            .parse()
                            .with_context(|| format!("parsing the address in {line:?}"));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(st) = self.child.try_wait()? {
                        bail!("{} exited ({st}): {}", self.what, self.stderr_tail());
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = self.wait(Duration::from_secs(10))?;
                    bail!("{} exited ({st}): {}", self.what, self.stderr_tail());
                }
            }
        }
    }

    fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                kill_tree(self.pid());
                let _ = self.child.wait();
                bail!(
                    "{} did not finish in {timeout:?} (killed): {}",
                    self.what,
                    self.stderr_tail()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `sig` and waits (30 s at most).
    fn stop_any(&mut self, sig: i32) -> Result<ExitStatus> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, sig) };
        self.wait(Duration::from_secs(30))
    }

    /// Sends `sig`, waits (30 s at most) and requires a clean exit.
    fn stop_ok(&mut self, sig: i32) -> Result<()> {
        let st = self.stop_any(sig)?;
        ensure!(
            st.success(),
            "{} exited with {st}: {}",
            self.what,
            self.stderr_tail()
        );
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            kill_tree(self.pid());
            let _ = self.child.wait();
        }
    }
}

/// Runs a command to its end (killed after `timeout`) and returns its stdout; fails on a
/// non-zero exit.
fn run_to_end(cmd: &mut Command, what: &str, timeout: Duration) -> Result<String> {
    let mut p = Proc::spawn(cmd, what, true)?;
    let mut out = p.child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    let st = p.wait(timeout)?;
    let stdout = rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    ensure!(st.success(), "{what} failed ({st}): {}", p.stderr_tail());
    Ok(stdout)
}

/// Every descendant of `pid` (from /proc's parent links).
fn descendants(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let ppid = fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let (_, rest) = s.rsplit_once(") ")?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                });
            if let Some(pp) = ppid {
                children.entry(pp).or_default().push(p);
            }
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

fn kill_tree(pid: u32) {
    let below = descendants(pid);
    // SAFETY: signalling processes we started (and theirs).
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    for p in below {
        // SAFETY: as above.
        unsafe { libc::kill(p as i32, libc::SIGKILL) };
    }
}

// ---------------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------------

struct EnvNotes {
    machine: Vec<(String, String)>,
    date: String,
    load_before: String,
    load_after: String,
    stats_on_before: bool,
    foreign_seen: usize,
    waited_s: f64,
    elapsed_s: f64,
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn date_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn machine_description(data_file: &Path) -> Vec<(String, String)> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let nproc = thread::available_parallelism().map_or(0, |n| n.get());
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kib: f64 = m
                .lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(format!("{:.1} GiB", kib / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let disk = fs::metadata(data_file)
        .ok()
        .map(|m| {
            let dev = m.dev();
            let (maj, min) = (libc::major(dev), libc::minor(dev));
            let name = fs::read_link(format!("/sys/dev/block/{maj}:{min}"))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "?".into());
            let disk_name = fs::read_link(format!("/sys/dev/block/{maj}:{min}"))
                .ok()
                .and_then(|p| {
                    let p = fs::canonicalize(Path::new("/sys/dev/block").join(p)).ok()?;
                    // A partition's directory sits inside its disk's.
                    if p.join("partition").exists() {
                        p.parent()?
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                    } else {
                        p.file_name().map(|n| n.to_string_lossy().into_owned())
                    }
                })
                .unwrap_or_else(|| name.clone());
            let sched = fs::read_to_string(format!("/sys/block/{disk_name}/queue/scheduler"))
                .ok()
                .and_then(|s| {
                    s.split_whitespace()
                        .find(|w| w.starts_with('['))
                        .map(|w| w.trim_matches(['[', ']']).to_string())
                })
                .unwrap_or_else(|| "?".into());
            format!("{name} ({maj}:{min}), scheduler {sched}")
        })
        .unwrap_or_else(|| "unknown".into());
    let tool = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .output()
            .ok()
            .map(|o| {
                let s = String::from_utf8_lossy(&o.stdout);
                s.lines().next().unwrap_or("").trim().to_string()
            })
            .unwrap_or_else(|| "?".into())
    };
    vec![
        ("CPU".into(), cpu),
        ("CPUs (nproc)".into(), nproc.to_string()),
        ("memory".into(), mem),
        ("kernel".into(), kernel),
        ("disk under target/bench".into(), disk),
        ("fio".into(), tool("fio", "--version")),
        ("bpftrace".into(), tool("bpftrace", "--version")),
    ]
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

fn median(xs: &[f64]) -> f64 {
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
fn percentile(xs: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn min_max(xs: &[f64]) -> (f64, f64) {
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

// ---------------------------------------------------------------------------------------------
// Summary
// ---------------------------------------------------------------------------------------------

fn prog_table_json(s: &ProgStats) -> Value {
    let m: serde_json::Map<String, Value> = s
        .iter()
        .map(|(k, c)| {
            let ns = if c.cnt > 0 {
                json!(c.time_ns as f64 / c.cnt as f64)
            } else {
                Value::Null
            };
            (
                k.clone(),
                json!({ "events": c.cnt, "run_time_ns": c.time_ns, "ns_per_event": ns }),
            )
        })
        .collect();
    Value::Object(m)
}

fn build_summary(
    cfg: &Cfg,
    env: &EnvNotes,
    fio: &FioResults,
    sys: &SysResults,
    probes: &ProbeResults,
    me: &SelfResults,
) -> Value {
    let fr = &fio.rounds;
    let sr = &sys.rounds;
    let fio_ratio = |v| median(&fr.ratios(v, |r: &FioRun| r.ns_per_io));
    let fio_cpu_ratio = |v| median(&fr.ratios(v, |r: &FioRun| r.cpu_ns_per_io));
    let sys_ratio = |v| median(&sr.ratios(v, |r: &LoopRun| r.ns_per_read));
    let sys_cpu_ratio = |v| median(&sr.ratios(v, |r: &LoopRun| r.cpu_ns_per_read));

    let fio_variants: serde_json::Map<String, Value> = Variant::FIO
        .iter()
        .map(|&v| {
            let runs = fr.get(v);
            let all = fr.all(v);
            let iops: Vec<f64> = runs.iter().map(|r| r.iops).collect();
            let cpu: Vec<f64> = runs.iter().map(|r| r.cpu_ns_per_io).collect();
            let ns: Vec<f64> = runs.iter().map(|r| r.ns_per_io).collect();
            (
                v.key().to_string(),
                json!({
                    "label": v.label(),
                    "median_iops": median(&iops),
                    "median_ns_per_io": median(&ns),
                    "median_cpu_ns_per_io": median(&cpu),
                    "iops_every_round": all.iter().map(|r| r.iops).collect::<Vec<_>>(),
                    "cpu_ns_per_io_every_round": all.iter().map(|r| r.cpu_ns_per_io).collect::<Vec<_>>(),
                }),
            )
        })
        .collect();
    let sys_variants: serde_json::Map<String, Value> = Variant::SYSCALL
        .iter()
        .map(|&v| {
            let runs = sr.get(v);
            let all = sr.all(v);
            let ns: Vec<f64> = runs.iter().map(|r| r.ns_per_read).collect();
            let cpu: Vec<f64> = runs.iter().map(|r| r.cpu_ns_per_read).collect();
            (
                v.key().to_string(),
                json!({
                    "label": v.label(),
                    "median_ns_per_read": median(&ns),
                    "median_cpu_ns_per_read": median(&cpu),
                    "ns_per_read_every_round": all.iter().map(|r| r.ns_per_read).collect::<Vec<_>>(),
                    "cpu_ns_per_read_every_round": all.iter().map(|r| r.cpu_ns_per_read).collect::<Vec<_>>(),
                }),
            )
        })
        .collect();

    let tracked = stats_merge(&probes.tracked_fio, &probes.tracked_loop);
    let untracked = stats_merge(&probes.untracked_fio, &probes.untracked_loop);
    let probe_ns = ns_per_event(&tracked);
    let peer_ns = ns_per_event(&probes.peer_fio);
    let probe_values: Vec<f64> = probe_ns.values().copied().collect();
    let peer_values: Vec<f64> = peer_ns.values().copied().collect();
    let weighted = |s: &ProgStats| {
        let c = total_cnt(s);
        if c > 0.0 { total_ns(s) / c } else { f64::NAN }
    };

    let mut out = json!({
        "quick": cfg.quick,
        "command": cfg.command(),
        "date": env.date,
        "machine": env.machine.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "loadavg_before": env.load_before,
        "loadavg_after": env.load_after,
        "bpf_stats_enabled_by_someone_else": env.stats_on_before,
        "foreign_tracing_programs_max_seen": env.foreign_seen,
        "waited_for_other_tracers_seconds": env.waited_s,
        "elapsed_seconds": env.elapsed_s,
        "rounds": { "fio": cfg.fio_rounds, "syscall": cfg.sys_rounds },
        "rounds_foreign_tracing_programs": { "fio": fr.foreign, "syscall": sr.foreign },
        "rounds_used": { "fio": fr.used(), "syscall": sr.used() },
        "fio_runtime_seconds": cfg.fio_runtime_s,
        "syscall_reads_per_run": cfg.sys_reads,
    });
    let ratios = json!({

        "untracked_syscall_overhead_ratio": sys_ratio(Variant::Untracked),
        "tracked_syscall_overhead_ratio": sys_ratio(Variant::Tracked),
        "tracked_fio_overhead_ratio": fio_ratio(Variant::Tracked),
        "untracked_fio_overhead_ratio": fio_ratio(Variant::Untracked),
        "peer_fio_overhead_ratio": fio_ratio(Variant::Peer),
        "untracked_syscall_cpu_overhead_ratio": sys_cpu_ratio(Variant::Untracked),
        "tracked_syscall_cpu_overhead_ratio": sys_cpu_ratio(Variant::Tracked),
        "tracked_fio_cpu_overhead_ratio": fio_cpu_ratio(Variant::Tracked),
        "untracked_fio_cpu_overhead_ratio": fio_cpu_ratio(Variant::Untracked),
        "peer_fio_cpu_overhead_ratio": fio_cpu_ratio(Variant::Peer),
        "fio": fio_variants,
        "syscall": sys_variants,
    });
    let probe_part = json!({

        "probe_ns_per_event": probe_ns,
        "probe_median_ns_per_event": median(&probe_values),
        "probe_weighted_ns_per_event": weighted(&tracked),
        "probe_untracked_ns_per_event": ns_per_event(&untracked),
        "peer_probe_ns_per_event": peer_ns,
        "peer_probe_median_ns_per_event": median(&peer_values),
        "probe_floor_ns_per_event": probes.floor_ns,
        "probe_bpf_ns_per_fio_io": {
            "tracked": total_ns(&probes.tracked_fio) / probes.tracked_fio_ios,
            "untracked": total_ns(&probes.untracked_fio) / probes.untracked_fio_ios,
            "peer": total_ns(&probes.peer_fio) / probes.peer_fio_ios,
        },
        "probe_bpf_ns_per_read": {
            "tracked": total_ns(&probes.tracked_loop) / probes.tracked_loop_reads,
            "untracked": total_ns(&probes.untracked_loop) / probes.untracked_loop_reads,
        },
        "probe_detail": {
            "tracked_fio": prog_table_json(&probes.tracked_fio),
            "tracked_readloop_mix": prog_table_json(&probes.tracked_loop),
            "untracked_fio": prog_table_json(&probes.untracked_fio),
            "untracked_readloop_mix": prog_table_json(&probes.untracked_loop),
            "peer_fio": prog_table_json(&probes.peer_fio),
        },
    });
    let self_part = json!({

        "stallmon_cpu_fraction": me.cpu_fraction,
        "stallmon_cpu_window_seconds": me.window_s,
        "stallmon_peak_rss_bytes": me.peak_rss_bytes,
        "stallmon_rss_bytes": me.rss_bytes,
        "job_processes": me.job_processes,
        "stallmon_tracked_processes_metric": me.tracked_processes,
        "scrape_count": me.scrape_s.len(),
        "scrape_median_seconds": median(&me.scrape_s),
        "scrape_p99_seconds": percentile(&me.scrape_s, 0.99),
        "scrape_max_seconds": min_max(&me.scrape_s).1,
        "scrape_body_bytes": me.scrape_bytes,
    });
    for part in [ratios, probe_part, self_part] {
        if let (Some(o), Value::Object(p)) = (out.as_object_mut(), part) {
            o.extend(p);
        }
    }
    out
}

/// Sanity of a summary (not timing goals): every required key, numbers finite, and nothing
/// negative that cannot be.
fn check_summary(v: &Value) -> Result<()> {
    let mut problems = Vec::new();
    for key in REQUIRED_KEYS {
        if v.get(key).is_none() {
            problems.push(format!("{key}: missing"));
        }
    }
    let num = |key: &str| v.get(key).and_then(Value::as_f64);
    for key in REQUIRED_KEYS.iter().filter(|k| k.ends_with("_ratio")) {
        match num(key) {
            Some(x) if x.is_finite() && x > -1.0 => {}
            _ => problems.push(format!("{key}: not a ratio > -1: {}", v[key])),
        }
    }
    for key in ["probe_ns_per_event", "peer_probe_ns_per_event"] {
        match v.get(key).and_then(Value::as_object) {
            Some(m) if !m.is_empty() => {
                for (prog, ns) in m {
                    if !ns.as_f64().is_some_and(|x| x.is_finite() && x > 0.0) {
                        problems.push(format!("{key}.{prog}: not a positive number: {ns}"));
                    }
                }
            }
            _ => problems.push(format!("{key}: not a non-empty object")),
        }
    }
    if !num("stallmon_cpu_fraction").is_some_and(|x| x.is_finite() && x >= 0.0) {
        problems.push(format!(
            "stallmon_cpu_fraction: not a number >= 0: {}",
            v["stallmon_cpu_fraction"]
        ));
    }
    if !v["stallmon_peak_rss_bytes"].as_u64().is_some_and(|x| x > 0) {
        problems.push(format!(
            "stallmon_peak_rss_bytes: not a positive integer: {}",
            v["stallmon_peak_rss_bytes"]
        ));
    }
    if !num("scrape_p99_seconds").is_some_and(|x| x.is_finite() && x > 0.0) {
        problems.push(format!(
            "scrape_p99_seconds: not a positive number: {}",
            v["scrape_p99_seconds"]
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(anyhow!("{}", problems.join("; ")))
    }
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:+.2}%", x * 100.0)
    } else {
        "n/a".into()
    }
}

fn range_pct(xs: &[f64]) -> String {
    if xs.is_empty() {
        return "n/a".into();
    }
    let (lo, hi) = min_max(xs);
    format!("{} .. {}", pct(lo), pct(hi))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn goals(s: &Value) -> Vec<(String, String, bool)> {
    let r = |k: &str| f(&s[k]);
    let probe_median = r("probe_median_ns_per_event");
    vec![
        (
            "untracked overhead, fio <= 1%".into(),
            pct(r("untracked_fio_overhead_ratio")),
            r("untracked_fio_overhead_ratio") <= GOAL_UNTRACKED_RATIO,
        ),
        (
            "untracked overhead, syscall loop <= 1%".into(),
            pct(r("untracked_syscall_overhead_ratio")),
            r("untracked_syscall_overhead_ratio") <= GOAL_UNTRACKED_RATIO,
        ),
        (
            "tracked fio overhead <= 2%".into(),
            pct(r("tracked_fio_overhead_ratio")),
            r("tracked_fio_overhead_ratio") <= GOAL_TRACKED_FIO_RATIO,
        ),
        (
            "tracked fio overhead below the peer's".into(),
            format!(
                "{} vs {}",
                pct(r("tracked_fio_overhead_ratio")),
                pct(r("peer_fio_overhead_ratio"))
            ),
            r("tracked_fio_overhead_ratio") < r("peer_fio_overhead_ratio"),
        ),
        (
            "median probe cost <= 100 ns/event".into(),
            format!("{probe_median:.0} ns"),
            probe_median <= GOAL_PROBE_NS,
        ),
        (
            "stallmon CPU <= 1% of a core".into(),
            format!("{:.2}%", r("stallmon_cpu_fraction") * 100.0),
            r("stallmon_cpu_fraction") <= GOAL_CPU_FRACTION,
        ),
        (
            "peak RSS <= 40 MiB".into(),
            format!("{:.1} MiB", r("stallmon_peak_rss_bytes") / 1048576.0),
            r("stallmon_peak_rss_bytes") <= GOAL_RSS_BYTES,
        ),
        (
            "scrape p99 <= 5 ms".into(),
            format!("{:.2} ms", r("scrape_p99_seconds") * 1e3),
            r("scrape_p99_seconds") <= GOAL_SCRAPE_P99_S,
        ),
    ]
}

fn goals_table(s: &Value) -> String {
    let mut out = String::from("| goal | measured | met |\n|---|---|---|\n");
    for (g, m, ok) in goals(s) {
        let _ = writeln!(out, "| {g} | {m} | {} |", if ok { "✓" } else { "✗" });
    }
    out
}

fn prog_rows(out: &mut String, tracked: &ProgStats, untracked: &ProgStats) {
    let _ = writeln!(
        out,
        "| program | events (tracked job) | ns/event (tracked job) | events (untracked) | ns/event (untracked) |\n|---|---:|---:|---:|---:|"
    );
    let names: std::collections::BTreeSet<&String> =
        tracked.keys().chain(untracked.keys()).collect();
    for name in names {
        let cell = |s: &ProgStats| match s.get(name) {
            Some(c) if c.cnt > 0 => (
                c.cnt.to_string(),
                format!("{:.0}", c.time_ns as f64 / c.cnt as f64),
            ),
            Some(c) => (c.cnt.to_string(), "-".into()),
            None => ("-".into(), "-".into()),
        };
        let (te, tn) = cell(tracked);
        let (ue, un) = cell(untracked);
        let _ = writeln!(out, "| `{name}` | {te} | {tn} | {ue} | {un} |");
    }
}

fn results_tables(
    fio: &FioResults,
    sys: &SysResults,
    probes: &ProbeResults,
    me: &SelfResults,
    s: &Value,
) -> String {
    let mut out = String::new();
    let fr = &fio.rounds;
    let _ = writeln!(
        out,
        "### 1. fio: 4 KiB random reads, O_DIRECT, psync, QD1 ({} rounds, medians)\n",
        fr.get(Variant::Baseline).len()
    );
    let _ = writeln!(
        out,
        "| variant | IOPS | µs per I/O | CPU µs per I/O | overhead (time per I/O) | per-round range | CPU overhead |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    for v in Variant::FIO {
        let runs = fr.get(v);
        let iops = median(&runs.iter().map(|r| r.iops).collect::<Vec<_>>());
        let ns = median(&runs.iter().map(|r| r.ns_per_io).collect::<Vec<_>>());
        let cpu = median(&runs.iter().map(|r| r.cpu_ns_per_io).collect::<Vec<_>>());
        let (ratio, range, cpu_ratio) = if v == Variant::Baseline {
            let spread: Vec<f64> = runs.iter().map(|r| r.ns_per_io / ns - 1.0).collect();
            (
                "(baseline)".to_string(),
                range_pct(&spread),
                "(baseline)".to_string(),
            )
        } else {
            let rs = fr.ratios(v, |r| r.ns_per_io);
            let cs = fr.ratios(v, |r| r.cpu_ns_per_io);
            (pct(median(&rs)), range_pct(&rs), pct(median(&cs)))
        };
        let _ = writeln!(
            out,
            "| {} | {iops:.0} | {:.2} | {:.2} | {ratio} | {range} | {cpu_ratio} |",
            v.label(),
            ns / 1e3,
            cpu / 1e3
        );
    }
    let sr = &sys.rounds;
    let _ = writeln!(
        out,
        "\n### 2. Syscall loop: 4 KiB read(2) from the page cache ({} rounds × {} reads, medians)\n",
        sr.get(Variant::Baseline).len(),
        s["syscall_reads_per_run"]
    );
    let _ = writeln!(
        out,
        "| variant | ns per read | CPU ns per read | overhead (time per read) | per-round range | CPU overhead |\n|---|---:|---:|---:|---:|---:|"
    );
    for v in Variant::SYSCALL {
        let runs = sr.get(v);
        let ns = median(&runs.iter().map(|r| r.ns_per_read).collect::<Vec<_>>());
        let cpu = median(&runs.iter().map(|r| r.cpu_ns_per_read).collect::<Vec<_>>());
        let (ratio, range, cpu_ratio) = if v == Variant::Baseline {
            let spread: Vec<f64> = runs.iter().map(|r| r.ns_per_read / ns - 1.0).collect();
            (
                "(baseline)".to_string(),
                range_pct(&spread),
                "(baseline)".to_string(),
            )
        } else {
            let rs = sr.ratios(v, |r| r.ns_per_read);
            let cs = sr.ratios(v, |r| r.cpu_ns_per_read);
            (pct(median(&rs)), range_pct(&rs), pct(median(&cs)))
        };
        let label = match v {
            Variant::Tracked => "(b) stallmon tracing the loop",
            other => other.label(),
        };
        let _ = writeln!(
            out,
            "| {label} | {ns:.1} | {cpu:.1} | {ratio} | {range} | {cpu_ratio} |"
        );
    }

    let _ = writeln!(
        out,
        "\n### 3. Probe cost from the kernel's counters (bpf_stats: run_time_ns / run_cnt)\n"
    );
    let _ = writeln!(
        out,
        "stallmon: median over programs **{:.0} ns/event**, event-weighted mean {:.0} ns/event (job tracked). \
         BPF time per fio I/O: tracked {:.0} ns, untracked {:.0} ns, peer {:.0} ns. \
         BPF time per read(2)-family call: tracked {:.0} ns, untracked {:.0} ns. \
         Floor on this machine (an empty bpftrace program on `syscalls:sys_enter_read`, same \
         counters): {:.0} ns/event.\n",
        f(&s["probe_median_ns_per_event"]),
        f(&s["probe_weighted_ns_per_event"]),
        f(&s["probe_bpf_ns_per_fio_io"]["tracked"]),
        f(&s["probe_bpf_ns_per_fio_io"]["untracked"]),
        f(&s["probe_bpf_ns_per_fio_io"]["peer"]),
        f(&s["probe_bpf_ns_per_read"]["tracked"]),
        f(&s["probe_bpf_ns_per_read"]["untracked"]),
        f(&s["probe_floor_ns_per_event"]),
    );
    let tracked = stats_merge(&probes.tracked_fio, &probes.tracked_loop);
    let untracked = stats_merge(&probes.untracked_fio, &probes.untracked_loop);
    prog_rows(&mut out, &tracked, &untracked);
    let _ = writeln!(
        out,
        "\nPeer (bpftrace 0.17, biolatency.bt, during fio): median {:.0} ns/event\n\n| program | events | ns/event |\n|---|---:|---:|",
        f(&s["peer_probe_median_ns_per_event"])
    );
    for (name, c) in &probes.peer_fio {
        let ns = if c.cnt > 0 {
            format!("{:.0}", c.time_ns as f64 / c.cnt as f64)
        } else {
            "-".into()
        };
        let _ = writeln!(out, "| `{name}` | {} | {ns} |", c.cnt);
    }

    let _ = writeln!(out, "\n### 4. stallmon itself\n");
    let _ = writeln!(
        out,
        "| measure | value |\n|---|---:|\n\
         | job | {} processes (python3 parent + children, each a 4 KiB pread every 50 ms) |\n\
         | `stallmon_tracked_processes` on /metrics | {} |\n\
         | CPU, share of one core (over {:.0} s, default 1 s interval, no GPU) | {:.3}% |\n\
         | peak RSS (VmHWM, after the scrapes) | {:.1} MiB |\n\
         | RSS at the end | {:.1} MiB |\n\
         | /metrics scrape latency, median ({} scrapes) | {:.3} ms |\n\
         | /metrics scrape latency, p99 | {:.3} ms |\n\
         | /metrics scrape latency, max | {:.3} ms |\n\
         | /metrics body size | {} bytes |",
        me.job_processes,
        me.tracked_processes
            .map_or("n/a".into(), |x| format!("{x:.0}")),
        me.window_s,
        me.cpu_fraction * 100.0,
        me.peak_rss_bytes as f64 / 1048576.0,
        me.rss_bytes as f64 / 1048576.0,
        me.scrape_s.len(),
        f(&s["scrape_median_seconds"]) * 1e3,
        f(&s["scrape_p99_seconds"]) * 1e3,
        f(&s["scrape_max_seconds"]) * 1e3,
        me.scrape_bytes,
    );
    out
}

fn render_doc(
    cfg: &Cfg,
    env: &EnvNotes,
    fio: &FioResults,
    sys: &SysResults,
    probes: &ProbeResults,
    me: &SelfResults,
    s: &Value,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Benchmarks\n\n\
         _Generated by `{}` on {}; every run overwrites this file. The same numbers, and every \
         individual run, are in `target/bench/summary.json`._\n",
        cfg.command(),
        env.date
    );
    let _ = writeln!(out, "## Machine\n\n| | |\n|---|---|");
    for (k, v) in &env.machine {
        let _ = writeln!(out, "| {k} | {v} |");
    }
    let rounds_note = |name: &str, n: usize, used: usize| {
        if used == n {
            format!("{name}: all {n} rounds free of other tracers")
        } else if used >= 2 {
            format!("{name}: {used} of {n} rounds free of other tracers (only those count)")
        } else {
            format!(
                "{name}: fewer than 2 of {n} rounds free of other tracers (all count; numbers are suspect)"
            )
        }
    };
    let _ = writeln!(
        out,
        "| load average before / after | {} / {} |\n\
         | other tracers | {}; {}; waited {:.0} s for them; at most {} of their programs seen |\n\
         | bpf_stats already enabled by someone else | {} |\n\
         | wall time of the benchmark | {:.0} s |\n",
        env.load_before,
        env.load_after,
        rounds_note("fio", fio.rounds.foreign.len(), fio.rounds.clean_rounds()),
        rounds_note(
            "syscall loop",
            sys.rounds.foreign.len(),
            sys.rounds.clean_rounds()
        ),
        env.waited_s,
        env.foreign_seen,
        if env.stats_on_before {
            "yes (ratios include its cost)"
        } else {
            "no"
        },
        env.elapsed_s
    );
    let _ = writeln!(
        out,
        "Command: `{}` (as root; it builds `target/release/stallmon` first). `--quick` is the \
         CI smoke-test version: fewer and shorter rounds, same structure.\n",
        cfg.command()
    );
    let _ = writeln!(out, "## Goals\n\n{}", goals_table(s));
    let _ = writeln!(
        out,
        "## Results\n\n{}",
        results_tables(fio, sys, probes, me, s)
    );
    let _ = writeln!(
        out,
        "Why the missed goals are missed, and what was changed to reach the others: [performance.md](performance.md).\n\n## Method\n\n\
- **Interleaved and repeated.** Each round runs every variant once, in an order rotated from \
round to round; a variant's overhead is computed per round against the same round's baseline \
(`variant / baseline - 1`, so +1% means 1% slower), and the reported overhead is the median over \
rounds. \"Per-round range\" shows the spread; for the baseline it is the spread of the baseline \
itself around its median, i.e. the noise floor of this machine. A ratio inside that range is \
not distinguishable from zero.\n\
- **fio** (phase 1): `fio --rw=randread --bs=4k --direct=1 --ioengine=psync --iodepth=1 \
--time_based --runtime={rt}s --ramp_time={ramp}ms` on a {mib} MiB file under `target/bench/`, \
{rounds} rounds (plus one unmeasured warm-up). Time per I/O is 1/IOPS; CPU per I/O is fio's \
usr+sys CPU share times its runtime, divided by the I/O count. Variants: (a) fio alone; (b) \
`stallmon trace -- fio ...` (fio tracked from exec; the start-up of stallmon, loading and \
verifying its programs, happens before fio starts and is not measured); (c) `stallmon trace \
--pid <a sleep>` running while fio runs untracked; (d) `bpftrace xtask/bench/biolatency.bt` \
(block_rq_issue/complete classic tracepoints keyed by dev+sector, log2 histogram).\n\
- **Syscall loop** (phase 2): `xtask/bench/readloop.c`, compiled at bench time, reads a {cmib} \
MiB file once into the page cache, then times {reads} `read(2)` calls of 4 KiB inside the \
process (wall and getrusage CPU of the loop only): alone, under `stallmon trace -- readloop`, \
and while stallmon traces an unrelated `sleep`.\n\
- **Probe cost** (phase 3): `BPF_ENABLE_STATS` (the same switch as `sysctl \
kernel.bpf_stats_enabled=1`) is on during this phase only, because the counters cost two clock \
reads per program run themselves. Counters are read from `/proc/<tracer>/fdinfo` of each \
program descriptor (run_time_ns, run_cnt), before and after the workload; names are the attach \
points (from the link's fdinfo, or `bpftool perf show` for the peer's perf-event attachments). \
\"Tracked job\" = fio then readloop in mix mode (read, pread64, readv, preadv, preadv2 in turn) \
started by stallmon; \"untracked\" = the same workloads while stallmon traces a `sleep`. The \
median is over programs that ran. These counters time the program body only: they do not \
include the tracepoint's own dispatch, nor, for the classic `syscalls:` tracepoints, the \
syscall-entry slow path that every syscall of every task takes while any syscall tracepoint is \
attached, nor the perf record each enabled syscall event builds before the program runs; that \
part shows only in the ratios of phase 2.\n\
- **stallmon itself** (phase 4): `stallmon trace --no-gpu -- python3 -c <job>` (default 1 s \
interval; `--no-gpu` makes \"NVML absent\" hold on every machine), job = {procs} processes. CPU \
share = utime+stime from `/proc/<pid>/stat` over a {secs} s window that starts after start-up \
and after the job has forked, with no scrapes in it. Then {scrapes} sequential `GET /metrics` \
over fresh HTTP/1.0 connections, 5 ms apart (latency = connect to last byte), then peak RSS = \
`VmHWM` from `/proc/<pid>/status`.\n\
- **Noise.** The machine is shared (see the load average and foreign tracing programs above); \
all processes started by the benchmark are killed on exit, error or not.\n",
        rt = cfg.fio_runtime_s,
        ramp = cfg.fio_ramp_ms,
        mib = FIO_FILE_MIB,
        rounds = cfg.fio_rounds,
        cmib = CACHE_FILE_MIB,
        reads = cfg.sys_reads,
        procs = JOB_PROCESSES,
        secs = cfg.self_secs,
        scrapes = SCRAPES,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Value {
        json!({
            "untracked_syscall_overhead_ratio": 0.003,
            "tracked_syscall_overhead_ratio": 0.4,
            "tracked_fio_overhead_ratio": 0.01,
            "untracked_fio_overhead_ratio": -0.002,
            "peer_fio_overhead_ratio": 0.02,
            "probe_ns_per_event": { "sched_switch": 80.0 },
            "peer_probe_ns_per_event": { "block_rq_issue": 200.0 },
            "stallmon_cpu_fraction": 0.004,
            "stallmon_peak_rss_bytes": 20_000_000u64,
            "scrape_p99_seconds": 0.002,
        })
    }

    #[test]
    fn sane_summary_passes() {
        check_summary(&good()).unwrap();
    }

    #[test]
    fn missing_or_impossible_values_fail() {
        for key in REQUIRED_KEYS {
            let mut v = good();
            v.as_object_mut().unwrap().remove(*key);
            assert!(check_summary(&v).is_err(), "{key} missing must fail");
        }
        let mut v = good();
        v["stallmon_cpu_fraction"] = json!(-0.1);
        assert!(check_summary(&v).is_err());
        let mut v = good();
        v["scrape_p99_seconds"] = Value::Null; // NaN serialises as null
        assert!(check_summary(&v).is_err());
        let mut v = good();
        v["tracked_fio_overhead_ratio"] = json!(-1.5);
        assert!(check_summary(&v).is_err());
        let mut v = good();
        v["probe_ns_per_event"] = json!({});
        assert!(check_summary(&v).is_err());
    }

    #[test]
    fn statistics() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let xs: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&xs, 0.99), 198.0);
        assert_eq!(percentile(&xs, 0.5), 100.0);
    }

    #[test]
    fn tracked_processes_are_summed_over_roles() {
        let body = "# HELP stallmon_tracked_processes Live processes\n\
                    stallmon_tracked_processes{job_name=\"j\",role=\"feeder\"} 1\n\
                    stallmon_tracked_processes{job_name=\"j\",role=\"worker\"} 63\n\
                    stallmon_target_up{job_name=\"j\"} 1\n";
        assert_eq!(tracked_processes(body), Some(64.0));
        assert_eq!(tracked_processes("nothing"), None);
    }

    #[test]
    fn readloop_output() {
        let r = parse_readloop("reads=1000 wall_ns=500000 cpu_ns=400000\n").unwrap();
        assert_eq!(r.ns_per_read, 500.0);
        assert_eq!(r.cpu_ns_per_read, 400.0);
        assert!(parse_readloop("nothing").is_err());
    }
}
