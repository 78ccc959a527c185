//! The Zabbix template (docs/integrations/zabbix/stallmon_template.yaml) against a real Zabbix
//! server (issue 13). Privileged and slow-ish (about 3 minutes, see the timings it prints); it
//! fails, never skips, when something is missing, and installs what it needs (tests/src/zabbix.rs).
//!
//! What it does, through Zabbix's JSON-RPC API:
//! 1. starts a throwaway Zabbix 6.0 (Debian 12's packages: tests/src/zabbix.rs) and imports the
//!    template (`configuration.import`);
//! 2. a host "stallmon-labels" points the template at a fixed exposition in which every series
//!    carries labels stallmon does not export yet (rank on per-job series; UUID, pod, namespace,
//!    container, hpc_job on GPU series, with duplicate series per GPU): the low-level discovery
//!    must find each GPU, block device and rank once, and every item must aggregate the extra
//!    series (sum for counters, max for gauges);
//! 3. a host "stallmon-storage" points it at a live stallmon tracing the bundled storage-bound job
//!    (reads throttled to 4 MiB/s) with the simulated GPU: the values Zabbix collected (GPU idle
//!    seconds by cause, the workers' file-read latency, the tracked processes, ...) must match
//!    what stallmon's own /metrics said at the same moment (tolerance below), and the triggers
//!    that correspond to Prometheus alerts must fire (GPU starved by storage; the Zabbix-only
//!    "workers' file reads are slow") or stay quiet (the others; the block-latency triggers of
//!    writes, flushes and discards are printed, not asserted: they watch the whole device, which
//!    the rest of the machine uses too);
//! 4. a host "stallmon-cached" does the same for the cached variant (data in the page cache, no
//!    throttle): none of those triggers may fire; meanwhile the storage host's stallmon has
//!    exited and "Failed to fetch metrics" (StallmonDown) must fire for it.
//!
//! Host macros shorten the template's defaults so that this takes minutes, not hours:
//! `{$STALLMON.INTERVAL}` 2s (collection), `{$STALLMON.WINDOW}` 30s (the rate() window of the
//! performance triggers, 10m by default), `{$STALLMON.NODATA.TIMEOUT}` 30s (Zabbix's minimum).
//!
//! Tolerance ("within one collection interval"): this test reads /metrics itself every 250 ms. A
//! value Zabbix stored at time t must lie between what /metrics said in the last reading that
//! ended at least 1 s before t and in the first reading that started after t (for a gauge:
//! between the smallest and largest reading in that span). stallmon refreshes /metrics once per
//! second, so the span covers about 1.3 s of the counter's growth, less than one Zabbix
//! collection interval (2 s). A rate item (change per second between two collections at t1 and
//! t2) must lie between the rates those brackets allow, and equal the one computed from Zabbix's
//! own two raw values; a windowed average (calculated item) must equal the ratio of the raw sum
//! and count increases over its window as Zabbix collected them (the window's edges are taken
//! within a few seconds, since the server evaluates it asynchronously).
//!
//! Run: `cargo test -p tests --test zabbix -- --nocapture` as root (`STALLMON_BIN` to test another
//! stallmon binary).

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;
use tests::{
    Finished, SlowDisk, Tracer, disk_name_of,
    gpu::StandinGpus,
    prom, require_privileged,
    zabbix::{self, HistoryValue, Zabbix},
};

/// Read throttle of the storage-bound job (as tests/tests/attribution.rs).
const THROTTLE_BPS: u64 = 4 << 20;
/// Training time of each job (seconds). The storage run must outlast the trigger window plus
/// discovery; the cached one must cover the window.
const STORAGE_RUN_S: u32 = 70;
const CACHED_RUN_S: u32 = 50;

/// Host macros (see the module doc).
const INTERVAL: &str = "2s";
const WINDOW: &str = "30s";
const WINDOW_S: f64 = 30.0;
const NODATA: &str = "30s";
/// A reading counts as "before" Zabbix's value when it ended this long before it.
const MARGIN_S: f64 = 1.0;

const TEMPLATE: &str = "docs/integrations/zabbix/stallmon_template.yaml";

// ================================================================================================
// PORT HERE when stallmon's command line changes: the only code that starts stallmon.
// ================================================================================================

/// Which variant of the bundled job stallmon traces.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Job {
    /// tests/workloads/trainloop.py reading uncached files through a 4 MiB/s read throttle
    /// (cgroup-v1 blkio, [`SlowDisk`]): GPU idle time is mostly cause "io".
    StorageBound,
    /// The same job with its data in the page cache and no throttle.
    Cached,
}

/// `stallmon trace` following the bundled training-loop imitation with a simulated GPU: the
/// storage-bound job or its cached variant, for `seconds` of training. stallmon exits when the
/// job does.
fn start_traced_job(job: Job, seconds: u32) -> TracedJob {
    let data = dataset(job);
    // The simulated GPU: the stand-in NVML library, driven by the job's own GPU steps.
    let gpus = StandinGpus::new(&format!("zabbix-{job:?}"), 1, 100, 200);
    let mut argv = tests::scenario::operations_job(&data, &gpus, seconds, job == Job::StorageBound);
    let slow = match job {
        Job::StorageBound => {
            let slow = SlowDisk::new("stallmon-zabbix", &data, THROTTLE_BPS)
                .expect("creating the blkio cgroup");
            argv = slow.wrap(&argv);
            Some(slow)
        }
        Job::Cached => None,
    };
    let mut args: Vec<String> = vec!["--interval".into(), "1s".into()];
    args.extend(gpus.args());
    args.push("--".into());
    args.extend(argv);
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let tracer = Tracer::launch("trace", &arg_refs, &gpus.env()).expect("starting stallmon trace");
    TracedJob {
        tracer: Some(tracer),
        _slow: slow,
        _gpus: gpus,
        data,
    }
}

// ================================================================================================

/// A running job under stallmon; stallmon is interrupted on drop if still running.
struct TracedJob {
    tracer: Option<Tracer>,
    _slow: Option<SlowDisk>,
    _gpus: StandinGpus,
    data: PathBuf,
}

impl TracedJob {
    fn addr(&self) -> SocketAddr {
        self.tracer.as_ref().unwrap().addr
    }

    /// Waits (bounded) until stallmon exits with the job.
    fn finish(mut self, timeout: Duration) -> Finished {
        let mut tracer = self.tracer.take().unwrap();
        let deadline = Instant::now() + timeout;
        while tracer.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                return tracer.stop().unwrap();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        tracer.wait().unwrap()
    }
}

impl Drop for TracedJob {
    /// On a failed test: SIGINT (stallmon detaches and stops the job it started), SIGKILL after
    /// 15 s.
    fn drop(&mut self) {
        let Some(mut t) = self.tracer.take() else {
            return;
        };
        if t.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(t.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while t.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = t.child.kill();
                let _ = t.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The dataset, evicted from the page cache for the storage-bound job, read once into it for
/// the cached one.
fn dataset(job: Job) -> PathBuf {
    tests::scenario::dataset(job == Job::Cached)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

// ------------------------------------------------------------------ /metrics readings

/// One reading of /metrics: when the request started and when the answer was complete.
#[derive(Clone)]
struct Reading {
    start: f64,
    end: f64,
    text: String,
}

/// Reads /metrics every 250 ms in a thread until stopped or until stallmon is gone.
struct Scraper {
    readings: Arc<Mutex<Vec<Reading>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Scraper {
    fn start(addr: SocketAddr) -> Self {
        let readings = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (readings.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let mut failures = 0;
            while !s.load(Ordering::Relaxed) && failures < 20 {
                let start = unix_now();
                match prom::http_get(addr, "/metrics") {
                    Ok((200, body)) => {
                        failures = 0;
                        r.lock().unwrap().push(Reading {
                            start,
                            end: unix_now(),
                            text: String::from_utf8_lossy(&body).into_owned(),
                        });
                    }
                    _ => failures += 1,
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        Self {
            readings,
            stop,
            handle: Some(handle),
        }
    }

    fn readings(&self) -> Vec<Reading> {
        self.readings.lock().unwrap().clone()
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ------------------------------------------------------------------ what an item reads

#[derive(Clone, Copy, PartialEq)]
enum Agg {
    Sum,
    Max,
}

/// The series a raw item reads: metric, label matchers (`k="v"`), aggregation, and whether it is
/// a counter (monotonic) or a gauge.
#[derive(Clone, Copy)]
struct Source {
    metric: &'static str,
    labels: &'static [&'static str],
    agg: Agg,
    counter: bool,
}

const fn counter(metric: &'static str, labels: &'static [&'static str]) -> Source {
    Source {
        metric,
        labels,
        agg: Agg::Sum,
        counter: true,
    }
}

const fn gauge(metric: &'static str, labels: &'static [&'static str], agg: Agg) -> Source {
    Source {
        metric,
        labels,
        agg,
        counter: false,
    }
}

/// Sample lines of `text` that `src` selects: (line, value).
fn lines_of(text: &str, src: &Source) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
            (name == src.metric && src.labels.iter().all(|m| labels.contains(m)))
                .then(|| Some((l.to_string(), value.parse::<f64>().ok()?)))?
        })
        .collect()
}

/// What the item reading `src` computes from `text` (None: no matching series).
fn value_of(text: &str, src: &Source) -> Option<f64> {
    let vals: Vec<f64> = lines_of(text, src).into_iter().map(|(_, v)| v).collect();
    if vals.is_empty() {
        return None;
    }
    Some(match src.agg {
        Agg::Sum => vals.iter().sum(),
        Agg::Max => vals.iter().cloned().fold(f64::MIN, f64::max),
    })
}

/// Raw items of the storage-bound host compared with /metrics.
const RAW: &[(&str, Source)] = &[
    (
        "stallmon.gpu.idle[0,io]",
        counter(
            "stallmon_gpu_idle_seconds_total",
            &[r#"gpu="0""#, r#"cause="io""#],
        ),
    ),
    (
        "stallmon.gpu.idle[0,preprocess]",
        counter(
            "stallmon_gpu_idle_seconds_total",
            &[r#"gpu="0""#, r#"cause="preprocess""#],
        ),
    ),
    (
        "stallmon.gpu.idle[0,host]",
        counter(
            "stallmon_gpu_idle_seconds_total",
            &[r#"gpu="0""#, r#"cause="host""#],
        ),
    ),
    (
        "stallmon.gpu.idle[0,other]",
        counter(
            "stallmon_gpu_idle_seconds_total",
            &[r#"gpu="0""#, r#"cause="other""#],
        ),
    ),
    (
        "stallmon.gpu.idle[0,all]",
        counter("stallmon_gpu_idle_seconds_total", &[r#"gpu="0""#]),
    ),
    (
        "stallmon.gpu.busy[0]",
        counter("stallmon_gpu_busy_seconds_total", &[r#"gpu="0""#]),
    ),
    (
        "stallmon.read.latency.sum[worker,file]",
        counter(
            "stallmon_read_stall_seconds_sum",
            &[r#"role="worker""#, r#"fd_kind="file""#],
        ),
    ),
    (
        "stallmon.read.latency.count[worker,file]",
        counter(
            "stallmon_read_stall_seconds_count",
            &[r#"role="worker""#, r#"fd_kind="file""#],
        ),
    ),
    (
        "stallmon.tracked_processes[feeder]",
        gauge(
            "stallmon_tracked_processes",
            &[r#"role="feeder""#],
            Agg::Sum,
        ),
    ),
    (
        "stallmon.tracked_processes[worker]",
        gauge(
            "stallmon_tracked_processes",
            &[r#"role="worker""#],
            Agg::Sum,
        ),
    ),
    (
        "stallmon.target_up",
        gauge("stallmon_target_up", &[], Agg::Max),
    ),
];

fn raw_source(key: &str) -> Source {
    RAW.iter().find(|(k, _)| *k == key).unwrap().1
}

/// Rate items (change per second, x100) and the raw item each depends on.
const RATIOS: &[(&str, &str)] = &[
    ("stallmon.gpu.idle.ratio[0,io]", "stallmon.gpu.idle[0,io]"),
    ("stallmon.gpu.idle.ratio[0,all]", "stallmon.gpu.idle[0,all]"),
];

/// One row of the comparison table.
struct Row {
    key: String,
    zabbix: f64,
    /// Seconds between Zabbix's value and the start of the storage run.
    at: f64,
    /// /metrics at the same moment: the sample lines of the first reading after Zabbix's value
    /// (or what stands for them).
    metrics: Vec<String>,
    lo: f64,
    hi: f64,
    ok: bool,
}

fn eps(x: f64) -> f64 {
    1e-9 * x.abs().max(1.0)
}

/// The readings bracketing time `t`: (last one ending MARGIN_S before, first one starting after).
fn bracket(readings: &[Reading], t: f64) -> Option<(&Reading, &Reading)> {
    let before = readings.iter().rev().find(|r| r.end <= t - MARGIN_S)?;
    let after = readings.iter().find(|r| r.start >= t)?;
    Some((before, after))
}

/// Bounds /metrics allows for the value of `src` at time `t`.
fn bounds_at(readings: &[Reading], t: f64, src: &Source) -> Option<(f64, f64, Vec<String>)> {
    let (b, a) = bracket(readings, t)?;
    let lines: Vec<String> = lines_of(&a.text, src).into_iter().map(|(l, _)| l).collect();
    if src.counter {
        Some((value_of(&b.text, src)?, value_of(&a.text, src)?, lines))
    } else {
        let span: Vec<f64> = readings
            .iter()
            .filter(|r| r.start >= b.start && r.start <= a.start)
            .filter_map(|r| value_of(&r.text, src))
            .collect();
        let lo = span.iter().cloned().fold(f64::MAX, f64::min);
        let hi = span.iter().cloned().fold(f64::MIN, f64::max);
        Some((lo, hi, lines))
    }
}

/// The newest value of `key` that has a /metrics reading after it.
fn newest_checkable(
    zbx: &Zabbix,
    items: &BTreeMap<String, Value>,
    key: &str,
    readings: &[Reading],
) -> (Vec<HistoryValue>, HistoryValue) {
    let item = items
        .get(key)
        .unwrap_or_else(|| panic!("Zabbix has no item {key}"));
    let hist = zbx.history(item, 60).unwrap();
    let last_start = readings.last().map_or(0.0, |r| r.start);
    let v = *hist
        .iter()
        .find(|h| h.t < last_start - 0.1)
        .unwrap_or_else(|| panic!("no value of {key} older than the last /metrics reading"));
    (hist, v)
}

fn check_raw(
    zbx: &Zabbix,
    items: &BTreeMap<String, Value>,
    readings: &[Reading],
    t0: f64,
    key: &str,
) -> Row {
    let src = raw_source(key);
    let (_, v) = newest_checkable(zbx, items, key, readings);
    let (lo, hi, metrics) = bounds_at(readings, v.t, &src)
        .unwrap_or_else(|| panic!("no /metrics readings around {key} at {}", v.t));
    Row {
        key: key.into(),
        zabbix: v.value,
        at: v.t - t0,
        metrics,
        lo,
        hi,
        ok: lo - eps(lo) <= v.value && v.value <= hi + eps(hi),
    }
}

fn check_ratio(
    zbx: &Zabbix,
    items: &BTreeMap<String, Value>,
    readings: &[Reading],
    t0: f64,
    key: &str,
    raw_key: &str,
) -> Row {
    let src = raw_source(raw_key);
    let (_, v) = newest_checkable(zbx, items, key, readings);
    let raw = zbx.history(&items[raw_key], 60).unwrap();
    let i2 = raw
        .iter()
        .position(|h| (h.t - v.t).abs() < 1e-6)
        .unwrap_or_else(|| panic!("{raw_key} has no value at the time of {key}'s"));
    let (r2, r1) = (raw[i2], raw[i2 + 1]);
    let dt = r2.t - r1.t;
    let exact = 100.0 * (r2.value - r1.value) / dt;
    let (lo2, hi2, metrics) = bounds_at(readings, r2.t, &src).expect("readings around t2");
    let (lo1, hi1, _) = bounds_at(readings, r1.t, &src).expect("readings around t1");
    let lo = 100.0 * (lo2 - hi1) / dt;
    let hi = 100.0 * (hi2 - lo1) / dt;
    let ok = lo - 1e-6 <= v.value
        && v.value <= hi + 1e-6
        && (v.value - exact).abs() <= 1e-6 * exact.abs().max(1.0);
    Row {
        key: key.into(),
        zabbix: v.value,
        at: v.t - t0,
        metrics: std::iter::once(format!(
            "100 x ({raw_key} increase over {dt:.3} s between two collections) = {exact:.6}; \
             /metrics at t2:"
        ))
        .chain(metrics)
        .collect(),
        lo,
        hi,
        ok,
    }
}

/// The calculated average latency against the raw sum and count Zabbix collected (and, for the
/// table, against /metrics over the same window).
fn check_avg(zbx: &Zabbix, items: &BTreeMap<String, Value>, readings: &[Reading], t0: f64) -> Row {
    let key = "stallmon.read.latency.avg[worker,file]";
    let (sum_key, count_key) = (
        "stallmon.read.latency.sum[worker,file]",
        "stallmon.read.latency.count[worker,file]",
    );
    let (_, v) = newest_checkable(zbx, items, key, readings);
    let sums = zbx.history(&items[sum_key], 60).unwrap();
    let counts = zbx.history(&items[count_key], 60).unwrap();
    let mut candidates = Vec::new();
    for e in sums
        .iter()
        .filter(|h| h.t <= v.t + 0.01 && h.t >= v.t - 6.0)
    {
        for b in sums
            .iter()
            .filter(|h| (h.t - (v.t - WINDOW_S)).abs() <= 4.0 && h.t < e.t)
        {
            let c = |t: f64| {
                counts
                    .iter()
                    .find(|h| (h.t - t).abs() < 1e-6)
                    .map(|h| h.value)
            };
            if let (Some(ce), Some(cb)) = (c(e.t), c(b.t))
                && ce > cb
            {
                candidates.push((e.value - b.value) / (ce - cb));
            }
        }
    }
    assert!(
        !candidates.is_empty(),
        "no raw values of {sum_key} around the window of {key}"
    );
    let lo = candidates.iter().cloned().fold(f64::MAX, f64::min);
    let hi = candidates.iter().cloned().fold(f64::MIN, f64::max);
    // /metrics over [t - W, t], for the table.
    let (s, c) = (raw_source(sum_key), raw_source(count_key));
    let at = |t: f64| readings.iter().rev().find(|r| r.start <= t);
    let metrics_avg = match (at(v.t), at(v.t - WINDOW_S)) {
        (Some(a), Some(b)) => {
            let ds = value_of(&a.text, &s).unwrap_or(0.0) - value_of(&b.text, &s).unwrap_or(0.0);
            let dc = value_of(&a.text, &c).unwrap_or(0.0) - value_of(&b.text, &c).unwrap_or(0.0);
            format!(
                "/metrics over the same {WINDOW}: sum +{ds:.3} s / count +{dc} = {:.6} s",
                ds / dc
            )
        }
        _ => "/metrics: no readings a window back".into(),
    };
    Row {
        key: key.into(),
        zabbix: v.value,
        at: v.t - t0,
        metrics: vec![
            metrics_avg,
            format!(
                "bounds: the sum/count increases Zabbix collected over {WINDOW} \
                 ({} choices of the window's edges)",
                candidates.len()
            ),
        ],
        lo: lo * (1.0 - 1e-3),
        hi: hi * (1.0 + 1e-3),
        ok: lo * (1.0 - 1e-3) <= v.value && v.value <= hi * (1.0 + 1e-3),
    }
}

fn print_table(title: &str, rows: &[Row]) {
    println!("\n== {title}");
    println!(
        "{:<44} {:>18} {:>8}  {:<39} ok",
        "Zabbix item key", "Zabbix value", "at (s)", "tolerance [lo, hi]"
    );
    for r in rows {
        println!(
            "{:<44} {:>18.6} {:>8.1}  [{:.6}, {:.6}]{} {}",
            r.key,
            r.zabbix,
            r.at,
            r.lo,
            r.hi,
            " ".repeat(39usize.saturating_sub(format!("[{:.6}, {:.6}]", r.lo, r.hi).len())),
            if r.ok { "yes" } else { "NO" }
        );
        for m in &r.metrics {
            println!("    /metrics: {m}");
        }
    }
}

// ------------------------------------------------------------------ extra labels

/// A fixed exposition in stallmon's format with the labels to come: ranks on per-job series,
/// UUID/pod/namespace/container/hpc_job on GPU series (two series per GPU, differing in
/// container), two block devices.
fn labels_exposition() -> String {
    let mut s = String::from("# stallmon exposition with extra labels (tests/tests/zabbix.rs)\n");
    let job = r#"job_name="ddp-7""#;
    let mut line = |name: &str, labels: &str, v: f64| {
        let sep = if labels.is_empty() { "" } else { "," };
        s.push_str(&format!("{name}{{{job}{sep}{labels}}} {v}\n"));
    };
    for (g, gpu) in ["0", "1"].iter().enumerate() {
        for (c, container) in ["trainer", "sidecar"].iter().enumerate() {
            let gl = format!(
                r#"gpu="{gpu}",UUID="GPU-{gpu}-4f1e",pod="train-0",namespace="ml",container="{container}",hpc_job="4242""#
            );
            let k = (g * 2 + c + 1) as f64;
            line(
                "stallmon_gpu_utilization_ratio",
                &format!(r#"{gl},model="H100""#),
                0.1 * k,
            );
            line("stallmon_gpu_busy_seconds_total", &gl, 10.0 * k);
            for (i, cause) in ["io", "preprocess", "host", "other"].iter().enumerate() {
                line(
                    "stallmon_gpu_idle_seconds_total",
                    &format!(r#"{gl},cause="{cause}""#),
                    k * (i + 1) as f64,
                );
            }
            line("stallmon_gpu_memory_used_bytes", &gl, 1e9 * k);
            line("stallmon_gpu_memory_total_bytes", &gl, 8e10);
            line("stallmon_gpu_temperature_celsius", &gl, 40.0 + k);
            line("stallmon_gpu_power_watts", &gl, 100.0 * k);
            line(
                "stallmon_gpu_pcie_bytes_total",
                &format!(r#"{gl},direction="rx""#),
                1e6 * k,
            );
            line(
                "stallmon_gpu_pcie_bytes_total",
                &format!(r#"{gl},direction="tx""#),
                2e6 * k,
            );
            line("stallmon_gpu_stale", &gl, 0.0);
        }
    }
    for rank in ["0", "1"] {
        let r: f64 = rank.parse().unwrap();
        let rl = format!(r#"rank="{rank}""#);
        if r == 0.0 {
            // Job-wide: no rank label.
            line("stallmon_target_up", "", 1.0);
        }
        for (role, n) in [("feeder", 1.0 - r), ("worker", 4.0 - r)] {
            line(
                "stallmon_tracked_processes",
                &format!(r#"{rl},role="{role}""#),
                n,
            );
            for state in [
                "on_cpu",
                "cpu_wait",
                "storage_wait",
                "ipc_wait",
                "other_wait",
            ] {
                line(
                    "stallmon_task_state_seconds_total",
                    &format!(r#"{rl},role="{role}",state="{state}""#),
                    5.0 + r,
                );
            }
            for fd in ["file", "ipc", "other"] {
                let l = format!(r#"{rl},role="{role}",fd_kind="{fd}""#);
                line("stallmon_read_stall_seconds_sum", &l, 2.5 + 8.0 * r);
                line("stallmon_read_stall_seconds_count", &l, 100.0 - 50.0 * r);
                line("stallmon_read_bytes_total", &l, 1e6 * (r + 1.0));
            }
        }
    }
    line(
        "stallmon_dropped_events_total",
        r#"reason="ringbuf_full""#,
        0.0,
    );
    line(
        "stallmon_dropped_events_total",
        r#"reason="procs_map_full""#,
        0.0,
    );
    for (d, dev) in ["nvme0n1", "sda"].iter().enumerate() {
        for (o, op) in ["read", "write"].iter().enumerate() {
            let l = format!(r#"device="{dev}",op="{op}""#);
            let k = (d * 2 + o + 1) as f64;
            line("stallmon_block_io_requests_total", &l, 10.0 * k);
            line("stallmon_block_io_bytes_total", &l, 40960.0 * k);
            line("stallmon_block_io_latency_seconds_sum", &l, 0.01 * k);
            line("stallmon_block_io_latency_seconds_count", &l, 10.0 * k);
            for role in ["feeder", "worker"] {
                line(
                    "stallmon_block_io_job_bytes_total",
                    &format!(r#"{l},role="{role}""#),
                    4096.0 * k,
                );
            }
        }
    }
    s.push_str("stallmon_gpu_simulated{job_name=\"ddp-7\"} 0\n");
    s
}

/// Serves a fixed text on /metrics (any path) on loopback, HTTP/1.0, until dropped.
struct FakeExporter {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl FakeExporter {
    fn start(body: String) -> Self {
        use std::io::{Read, Write};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(
                    conn,
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Self {
            addr,
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for FakeExporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Items of the labels host and what they must equal, computed from the exposition.
fn labels_expectations(text: &str) -> Vec<(&'static str, f64)> {
    let v = |src: Source| value_of(text, &src).unwrap();
    let util0 = v(gauge(
        "stallmon_gpu_utilization_ratio",
        &[r#"gpu="0""#],
        Agg::Max,
    ));
    vec![
        (
            "stallmon.gpu.idle[0,io]",
            v(counter(
                "stallmon_gpu_idle_seconds_total",
                &[r#"gpu="0""#, r#"cause="io""#],
            )),
        ),
        (
            "stallmon.gpu.idle[1,all]",
            v(counter("stallmon_gpu_idle_seconds_total", &[r#"gpu="1""#])),
        ),
        (
            "stallmon.gpu.busy[1]",
            v(counter("stallmon_gpu_busy_seconds_total", &[r#"gpu="1""#])),
        ),
        ("stallmon.gpu.utilization[0]", 100.0 * util0),
        (
            "stallmon.gpu.memory.used[1]",
            v(gauge(
                "stallmon_gpu_memory_used_bytes",
                &[r#"gpu="1""#],
                Agg::Max,
            )),
        ),
        (
            "stallmon.gpu.stale[1]",
            v(gauge("stallmon_gpu_stale", &[r#"gpu="1""#], Agg::Max)),
        ),
        (
            "stallmon.tracked_processes[worker]",
            v(gauge(
                "stallmon_tracked_processes",
                &[r#"role="worker""#],
                Agg::Sum,
            )),
        ),
        (
            "stallmon.read.latency.sum[worker,file]",
            v(counter(
                "stallmon_read_stall_seconds_sum",
                &[r#"role="worker""#, r#"fd_kind="file""#],
            )),
        ),
        (
            "stallmon.target_up",
            v(gauge("stallmon_target_up", &[], Agg::Max)),
        ),
        (
            "stallmon.rank.target_up[0]",
            v(gauge(
                "stallmon_tracked_processes",
                &[r#"rank="0""#, r#"role="feeder""#],
                Agg::Max,
            )),
        ),
        (
            "stallmon.rank.target_up[1]",
            v(gauge(
                "stallmon_tracked_processes",
                &[r#"rank="1""#, r#"role="feeder""#],
                Agg::Max,
            )),
        ),
        (
            "stallmon.rank.tracked_processes[1,worker]",
            v(gauge(
                "stallmon_tracked_processes",
                &[r#"rank="1""#, r#"role="worker""#],
                Agg::Sum,
            )),
        ),
        (
            "stallmon.rank.read.latency.count[0,worker,file]",
            v(counter(
                "stallmon_read_stall_seconds_count",
                &[r#"rank="0""#, r#"role="worker""#, r#"fd_kind="file""#],
            )),
        ),
        (
            "stallmon.block.requests[sda,write]",
            v(counter(
                "stallmon_block_io_requests_total",
                &[r#"device="sda""#, r#"op="write""#],
            )),
        ),
        (
            "stallmon.block.latency.sum[nvme0n1,read]",
            v(counter(
                "stallmon_block_io_latency_seconds_sum",
                &[r#"device="nvme0n1""#, r#"op="read""#],
            )),
        ),
    ]
}

fn check_labels_host(zbx: &Zabbix, host: &str, text: &str) {
    let expected = labels_expectations(text);
    let items = zabbix::wait_for(
        "the labels host's discovered items to have values",
        Duration::from_secs(90),
        Duration::from_secs(1),
        || {
            let items = zbx.items(host)?;
            let ready = expected.iter().all(|(k, _)| {
                items
                    .get(*k)
                    .is_some_and(|i| i["lastclock"].as_str().unwrap_or("0") != "0")
            });
            Ok(ready.then_some(items))
        },
    )
    .unwrap();
    println!("\n== extra labels (host stallmon-labels: fixed exposition, 2 series per GPU, ranks)");
    let mut bad = Vec::new();
    for (key, want) in &expected {
        let got: f64 = items[*key]["lastvalue"].as_str().unwrap().parse().unwrap();
        let ok = (got - want).abs() <= eps(*want);
        println!(
            "{key:<48} Zabbix {got:>14} expected {want:>14} {}",
            if ok { "ok" } else { "MISMATCH" }
        );
        if !ok {
            bad.push(key);
        }
    }
    assert!(
        bad.is_empty(),
        "wrong aggregation over extra labels: {bad:?}"
    );
    assert_eq!(
        items["stallmon.job_name"]["lastvalue"], "ddp-7",
        "job name from the labels"
    );
    // One discovered entity per GPU, device-operation pair and rank, whatever the extra labels.
    let count = |prefix: &str| items.keys().filter(|k| k.starts_with(prefix)).count();
    assert_eq!(count("stallmon.gpu.utilization["), 2, "GPU rows");
    assert_eq!(count("stallmon.block.requests["), 4, "block rows");
    assert_eq!(count("stallmon.rank.target_up["), 2, "rank rows");
    let desc = items["stallmon.gpu.utilization[1]"]["description"]
        .as_str()
        .unwrap();
    assert!(
        desc.contains("GPU-1-4f1e") && desc.contains("H100"),
        "{{#UUID}}/{{#MODEL}} from the UUID label: {desc}"
    );
    let errors = zbx.discovery_errors(host).unwrap();
    assert!(errors.is_empty(), "discovery rules in error: {errors:?}");
    // Not supported: none, but calculated items before their window holds two values.
    let unsupported: Vec<String> = items
        .values()
        .filter(|i| i["state"] == "1" && i["type"] != "15")
        .map(|i| format!("{}: {}", i["key_"], i["error"]))
        .collect();
    assert!(unsupported.is_empty(), "not supported: {unsupported:#?}");
    let rank_exited = "Stallmon: Rank 1 exited while the job runs";
    zabbix::wait_for(
        "the rank trigger to fire",
        Duration::from_secs(30),
        Duration::from_secs(1),
        || {
            let t = zbx.triggers(host)?;
            Ok(t.iter()
                .any(|t| t.name == rank_exited && t.value == 1)
                .then_some(()))
        },
    )
    .unwrap();
    let t = zbx.triggers(host).unwrap();
    assert!(
        t.iter()
            .any(|t| t.name == "Stallmon: Rank 0 exited while the job runs" && t.value == 0),
        "{t:#?}"
    );
    println!("discovery: 2 GPUs, 4 device-operation pairs, 2 ranks; \"{rank_exited}\" fired");
}

// ------------------------------------------------------------------ the test

/// Names of the template's triggers that stand for the Prometheus alerts, on GPU 0 and the
/// data set's disk `dev`.
fn counterparts(dev: &str) -> Vec<(String, &'static str)> {
    vec![
        (
            "Stallmon: GPU 0 is starved by storage".into(),
            "StallmonGPUIdleIOBound",
        ),
        (
            "Stallmon: GPU 0 is starved by CPU preprocessing".into(),
            "StallmonGPUIdlePreprocessBound",
        ),
        (
            format!("Stallmon: {dev} read latency is high"),
            "StallmonStorageLatencyHigh",
        ),
        (
            "Stallmon: Dropping kernel events".into(),
            "StallmonDroppingEvents",
        ),
        ("Stallmon: Failed to fetch metrics".into(), "StallmonDown"),
        (
            "Stallmon: GPU 0 stopped answering NVML".into(),
            "StallmonGPUStale",
        ),
        (
            "Stallmon: Workers' file reads are slow".into(),
            "(Zabbix only)",
        ),
    ]
}

const IO_BOUND: &str = "Stallmon: GPU 0 is starved by storage";
const SLOW_READS: &str = "Stallmon: Workers' file reads are slow";
const DOWN: &str = "Stallmon: Failed to fetch metrics";

fn host_macros(port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("{$STALLMON.PORT}", port.to_string()),
        ("{$STALLMON.INTERVAL}", INTERVAL.into()),
        ("{$STALLMON.WINDOW}", WINDOW.into()),
        ("{$STALLMON.NODATA.TIMEOUT}", NODATA.into()),
    ]
}

fn create_host(zbx: &Zabbix, name: &str, template: &str, port: u16) -> String {
    let m = host_macros(port);
    let refs: Vec<(&str, &str)> = m.iter().map(|(k, v)| (*k, v.as_str())).collect();
    zbx.create_host(name, template, &refs)
        .unwrap_or_else(|e| panic!("creating host {name}: {e:#}"))
}

fn print_triggers(zbx: &Zabbix, host_id: &str, host: &str) -> BTreeMap<String, f64> {
    let fired = zbx.fired(host_id).unwrap();
    let problems = zbx.problems(host_id).unwrap();
    println!("\n== triggers of {host} (fired = went to problem at least once)");
    for t in zbx.triggers(host_id).unwrap() {
        println!(
            "{:<54} {:<7} value {} state {}{}",
            t.name,
            if fired.contains_key(&t.name) {
                "FIRED"
            } else {
                "quiet"
            },
            t.value,
            if t.state == 0 { "normal" } else { "unknown" },
            if t.error.is_empty() {
                String::new()
            } else {
                format!(" ({})", t.error)
            }
        );
    }
    println!("current problems (problem.get): {problems:?}");
    fired
}

#[test]
fn zabbix_collects_stallmon_and_fires_its_triggers() {
    require_privileged();
    let t_total = Instant::now();
    let mut timings: Vec<(String, Duration)> = Vec::new();

    let install = zabbix::ensure_installed(Duration::from_secs(600))
        .unwrap_or_else(|e| panic!("installing Zabbix: {e:#}"));
    timings.push((
        if install.installed.is_empty() {
            "install: already installed (check only)".to_string()
        } else {
            format!("install: apt-get install {:?}", install.installed)
        },
        install.elapsed,
    ));
    let zbx = Zabbix::start().unwrap_or_else(|e| panic!("starting Zabbix: {e:#}"));
    timings.extend(zbx.timings.iter().map(|(n, d)| (n.to_string(), *d)));
    assert!(
        zbx.version.starts_with("6.0."),
        "expected Debian 12's Zabbix 6.0, the API says {}",
        zbx.version
    );
    let t = Instant::now();
    let yaml = std::fs::read_to_string(tests::repo_root().join(TEMPLATE)).unwrap();
    let template = zbx
        .import_template(&yaml)
        .unwrap_or_else(|e| panic!("importing {TEMPLATE}: {e:#}"));
    timings.push(("template import (configuration.import)".into(), t.elapsed()));

    // Extra labels, against a fixed exposition.
    let text = labels_exposition();
    let fake = FakeExporter::start(text.clone());
    let labels_host = create_host(&zbx, "stallmon-labels", &template, fake.addr.port());

    // The storage-bound job.
    let t_storage = Instant::now();
    let job = start_traced_job(Job::StorageBound, STORAGE_RUN_S);
    let t0 = unix_now();
    let dev = disk_name_of(&job.data).unwrap();
    let scraper = Scraper::start(job.addr());
    let storage_host = create_host(&zbx, "stallmon-storage", &template, job.addr().port());

    let keys: Vec<&str> = RAW
        .iter()
        .map(|(k, _)| *k)
        .chain(RATIOS.iter().map(|(k, _)| *k))
        .chain(["stallmon.read.latency.avg[worker,file]"])
        .collect();
    // Values for every compared item, and a whole trigger window of them.
    let first = zabbix::wait_for(
        "Zabbix to collect the compared items",
        Duration::from_secs(60),
        Duration::from_secs(1),
        || {
            let items = zbx.items(&storage_host)?;
            let ready = keys.iter().all(|k| {
                items
                    .get(*k)
                    .is_some_and(|i| i["lastclock"].as_str().unwrap_or("0") != "0")
            });
            Ok(ready.then(unix_now))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", zbx.server_log(30)));
    println!(
        "storage host: Zabbix had values of every compared item {:.1} s after stallmon started",
        first - t0
    );
    let fired = zabbix::wait_for(
        "the storage-bound triggers to fire",
        Duration::from_secs(STORAGE_RUN_S as u64),
        Duration::from_secs(1),
        || {
            let f = zbx.fired(&storage_host)?;
            Ok((f.contains_key(IO_BOUND) && f.contains_key(SLOW_READS)).then_some(f))
        },
    );
    let settle = (first + WINDOW_S + 6.0 - unix_now()).max(0.0);
    std::thread::sleep(Duration::from_secs_f64(settle));
    let items = zbx.items(&storage_host).unwrap();
    let readings = scraper.readings();
    let mut rows: Vec<Row> = RAW
        .iter()
        .map(|(k, _)| check_raw(&zbx, &items, &readings, t0, k))
        .collect();
    rows.extend(
        RATIOS
            .iter()
            .map(|(k, raw)| check_ratio(&zbx, &items, &readings, t0, k, raw)),
    );
    rows.push(check_avg(&zbx, &items, &readings, t0));
    print_table(
        "storage-bound job: Zabbix's values against stallmon's /metrics at the same moment",
        &rows,
    );

    check_labels_host(&zbx, &labels_host, &text);
    drop(fake);

    let fin = job.finish(Duration::from_secs(STORAGE_RUN_S as u64 + 60));
    let storage_ended = unix_now();
    drop(scraper);
    assert!(
        fin.status.success(),
        "storage-bound job or stallmon failed ({}): {}",
        fin.status,
        fin.stderr
    );
    timings.push((
        "storage-bound run (with checks)".into(),
        t_storage.elapsed(),
    ));
    let storage_fired = print_triggers(&zbx, &storage_host, "stallmon-storage (storage-bound)");

    // The cached variant.
    let t_cached = Instant::now();
    let job = start_traced_job(Job::Cached, CACHED_RUN_S);
    let cached_host = create_host(&zbx, "stallmon-cached", &template, job.addr().port());
    let fin = job.finish(Duration::from_secs(CACHED_RUN_S as u64 + 60));
    assert!(
        fin.status.success(),
        "cached job or stallmon failed ({}): {}",
        fin.status,
        fin.stderr
    );
    timings.push(("cached run".into(), t_cached.elapsed()));
    let cached_fired = print_triggers(&zbx, &cached_host, "stallmon-cached (cached)");
    let cached_triggers = zbx.triggers(&cached_host).unwrap();
    let cached_items = zbx.items(&cached_host).unwrap();
    let last = |k: &str| -> f64 {
        cached_items[k]["lastvalue"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    println!(
        "cached run, last values: GPU 0 idle {:.2}% of wall time, io {:.2}%; workers' file-read \
         latency {:.6} s over {WINDOW}",
        last("stallmon.gpu.idle.ratio[0,all]"),
        last("stallmon.gpu.idle.ratio[0,io]"),
        last("stallmon.read.latency.avg[worker,file]"),
    );

    // StallmonDown: the storage host's stallmon is gone.
    let t = Instant::now();
    let down = zabbix::wait_for(
        "\"Failed to fetch metrics\" on the storage host",
        Duration::from_secs(120),
        Duration::from_secs(2),
        || Ok(zbx.fired(&storage_host)?.get(DOWN).copied()),
    );
    timings.push((
        "waiting for nodata after the cached run".into(),
        t.elapsed(),
    ));

    println!("\n== triggers standing for the Prometheus alerts");
    println!(
        "{:<46} {:<32} {:<28} cached",
        "trigger", "Prometheus alert", "storage-bound"
    );
    for (name, alert) in counterparts(&dev) {
        let s = match storage_fired.get(&name) {
            Some(at) => format!("FIRED at +{:.0} s", at - t0),
            None if name == DOWN => match &down {
                Ok(at) => format!(
                    "quiet; FIRED {:.0} s after exit",
                    at - storage_ended.floor()
                ),
                Err(_) => "quiet; did not fire after exit".into(),
            },
            None => "quiet".into(),
        };
        let c = if cached_fired.contains_key(&name) {
            "FIRED"
        } else {
            "quiet"
        };
        println!("{name:<46} {alert:<32} {s:<28} {c}");
    }

    println!("\n== timings");
    timings.push(("total".into(), t_total.elapsed()));
    for (name, d) in &timings {
        println!("{name:<60} {:>7.1} s", d.as_secs_f64());
    }
    println!("Zabbix {} (API), template {TEMPLATE}", zbx.version);

    // Verdicts, after everything was printed.
    let bad: Vec<&str> = rows
        .iter()
        .filter(|r| !r.ok)
        .map(|r| r.key.as_str())
        .collect();
    assert!(
        bad.is_empty(),
        "Zabbix's values differ from /metrics: {bad:?}"
    );
    let fired = fired.unwrap_or_else(|e| panic!("{e:#}"));
    for must in [IO_BOUND, SLOW_READS] {
        assert!(
            fired.contains_key(must),
            "storage-bound: {must:?} did not fire: {fired:?}"
        );
    }
    // The triggers standing for the alerts (and the workers' reads) that must stay quiet. Both
    // lists were taken right after the job ended, before "Failed to fetch metrics" could fire.
    // The block triggers of other operations (write, flush, discard) are not asserted: they
    // watch the whole device, which other processes on the machine use too.
    let quiet_storage: Vec<String> = counterparts(&dev)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n != IO_BOUND && n != SLOW_READS)
        .collect();
    let loud: Vec<&String> = quiet_storage
        .iter()
        .filter(|n| storage_fired.contains_key(*n))
        .collect();
    assert!(loud.is_empty(), "storage-bound: these fired: {loud:?}");
    let loud: Vec<String> = counterparts(&dev)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| cached_fired.contains_key(n))
        .collect();
    assert!(loud.is_empty(), "cached: these fired: {loud:?}");
    // Quiet because evaluated and false, not because unknown.
    for (name, _) in counterparts(&dev) {
        if name == DOWN {
            continue;
        }
        let t = cached_triggers
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("cached host has no trigger {name:?}"));
        assert_eq!(t.state, 0, "{name} could not be evaluated: {}", t.error);
    }
    down.unwrap_or_else(|e| panic!("{e:#}"));
}
