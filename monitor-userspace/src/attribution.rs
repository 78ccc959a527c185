//! Attribution of GPU idle time to causes: **io**, **preprocess**, **host**, **other**.
//!
//! This implements the project's attribution contract (categories, conservation; see the method
//! below). Inputs, all on `CLOCK_MONOTONIC` ns:
//!
//! - the feeder thread's state changes `(ts_ns, state)` (the state holds from `ts_ns` until the next
//!   change; [`STATE_UNKNOWN`] marks time without knowledge, e.g. after the feeder exited);
//! - [`WorkerSlice`]s: the aggregate time all worker threads spent in each state over a poll
//!   window (~100 ms, windows contiguous);
//! - per GPU, [`UtilSample`]s: the busy fraction `u` of a period `[t0, t1)`.
//!
//! # Method
//!
//! For each sample period `[t0, t1)` of length `P`, `busy = u·P` and `idle = P - busy`. The feeder's
//! time in the period is classified (it adds up to `P`):
//!
//! - `storage_wait` → **io** (the training loop reads the data itself, `num_workers=0`);
//! - `ipc_wait` (waiting for a batch) → split by what the workers did in the same period, pro-rated
//!   from the overlapping worker slices: with `S` = workers' `storage_wait`, `C` = workers' `on_cpu`
//!   and `W` = the wall time covered by worker slices, a share `g = min(1, (S + C) / W)` of the wait
//!   is *explained by the data pipeline* and goes to **io** and **preprocess** in the ratio `S : C`;
//!   the rest, `1 - g`, goes to **other**. `g` reaches 1 as soon as the workers together were busy
//!   one worker-equivalent (one slow worker is enough to make the feeder wait, since batches are
//!   delivered in order). When workers did neither (no workers, all idle in their index queues,
//!   or no worker data), the feeder is waiting on something else: a collective, a synchronization,
//!   a queue that is not the input pipeline. That is **other**, not preprocess. (Worker `ipc_wait`
//!   and `other_wait` are deliberately not evidence: reading from a socket could be remote storage,
//!   but it could as well be an idle worker blocked on its index queue.)
//! - `on_cpu` → **host**;
//! - `other_wait`, and unknown time (before the first feeder event, or [`STATE_UNKNOWN`]) → **other**.
//!
//! NVML says how much of a period was idle, not when. The classified times are then fitted into
//! `idle` by the [`Allocation`] rule, so that `io + preprocess + host + other == idle` exactly:
//!
//! - [`Allocation::Priority`] (default): fill `idle` in order of how surely a feeder state implies an
//!   idle GPU. Data waits first (**io** + **preprocess**; scaled down together if they exceed
//!   `idle`): while the feeder waits for data it cannot enqueue work and the GPU drains. Then
//!   **host** (on-CPU time usually overlaps kernels that were launched asynchronously, so only the
//!   remainder is idle because of it), then **other** takes what is left. No cause ever exceeds the
//!   feeder's time in it.
//! - [`Allocation::Proportional`]: the literal reading of the contract, every cause scaled by
//!   `idle / P`.
//!
//! Conservation holds per GPU: `busy + io + preprocess + host + other == wall` (sum of periods).
//!
//! # Streaming
//!
//! A GPU period is processed once the feeder and worker data cover its end (the *watermark*:
//! the minimum of the feeder watermark, advanced by events and by
//! [`Attributor::feeder_complete_until`], and the end of the last worker slice). GPU samples wait
//! in a per-GPU queue until then, or until they are older than the retention horizon relative to
//! the newest sample of their GPU (then they are processed with whatever data there is). Timeline
//! data older than the newest data minus the retention are dropped, so memory stays bounded.
//! Feeding the same calls in the same order always gives the same totals, which is what
//! `stallmon report` relies on (see [`AttributionRecord`] and [`Attributor::apply`]).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;

use monitor_common::{
    NUM_STATES, STATE_IPC_WAIT, STATE_ON_CPU, STATE_OTHER_WAIT, STATE_STORAGE_WAIT,
};
use serde::{Deserialize, Serialize};

use crate::gpu::{GpuInfo, UtilSample};

/// Number of idle causes.
pub const NUM_CAUSES: usize = 4;
pub const CAUSE_IO: usize = 0;
pub const CAUSE_PREPROCESS: usize = 1;
pub const CAUSE_HOST: usize = 2;
pub const CAUSE_OTHER: usize = 3;
/// Cause names, indexed by `CAUSE_*` (the Prometheus `cause` label values).
pub const CAUSE_NAMES: [&str; NUM_CAUSES] = ["io", "preprocess", "host", "other"];

/// Feeder state meaning "not known" (any state value `>= NUM_STATES` is treated as this).
pub const STATE_UNKNOWN: u32 = u32::MAX;

/// Default retention of timeline data behind the newest data, and the longest a GPU sample waits
/// for the watermark.
pub const DEFAULT_RETENTION_NS: u64 = 30_000_000_000;

/// GPUs are "GPU-bound" when idle less than this fraction of the wall time.
pub const GPU_BOUND_IDLE_FRACTION: f64 = 0.10;

/// How the classified feeder time of a period is fitted into the period's idle time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Allocation {
    /// Data waits first, then host, then other (see the module docs).
    #[default]
    Priority,
    /// Every cause scaled by `idle / period`.
    Proportional,
}

/// Attributor settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttributorConfig {
    pub allocation: Allocation,
    /// See [`DEFAULT_RETENTION_NS`].
    pub retention_ns: u64,
}

impl Default for AttributorConfig {
    fn default() -> Self {
        Self {
            allocation: Allocation::Priority,
            retention_ns: DEFAULT_RETENTION_NS,
        }
    }
}

/// Aggregate time of all worker threads in each state (`STATE_*` index) over `[start_ns, end_ns)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSlice {
    pub start_ns: u64,
    pub end_ns: u64,
    pub state_ns: [u64; NUM_STATES],
}

/// Attributed time of one GPU so far, in seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuTotals {
    pub gpu: u32,
    /// Sum of the attributed sample periods.
    pub wall_s: f64,
    pub busy_s: f64,
    /// Idle time by cause, indexed by `CAUSE_*`.
    pub idle_s: [f64; NUM_CAUSES],
    /// The part of `idle_s[CAUSE_IO]` during which the feeder itself was reading (synchronous
    /// loading); the rest came through workers.
    pub io_feeder_s: f64,
    /// Sample periods attributed.
    pub samples: u64,
    /// Samples rejected (zero period, non-finite utilization, or entirely before data already
    /// attributed for this GPU).
    pub dropped_samples: u64,
}

impl GpuTotals {
    /// Total idle time (the sum of the causes).
    pub fn idle_total_s(&self) -> f64 {
        self.idle_s.iter().sum()
    }
}

/// One line of the record file that matters for attribution (JSON lines tagged with `"type"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AttributionRecord {
    /// `{"type":"feeder","events":[[ts_ns,state],...],"until_ns":T}`
    Feeder(FeederRecord),
    /// `{"type":"worker_slice","start_ns":..,"end_ns":..,"state_ns":[..4]}`
    WorkerSlice(WorkerSlice),
    /// `{"type":"gpu","gpu":0,"uuid":"..","model":"..","source":"nvml","samples":[[end_ns,period_ns,util],...]}`
    Gpu(GpuRecord),
}

impl AttributionRecord {
    /// The `"type"` tags of the variants.
    pub const TYPES: [&'static str; 3] = ["feeder", "worker_slice", "gpu"];
}

/// A batch of feeder state changes, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeederRecord {
    /// `(ts_ns, state)` pairs.
    pub events: Vec<(u64, u32)>,
    /// All feeder events before this time are in this or earlier records (the ring buffer was
    /// drained at this time). Without it the feeder watermark is the last event's time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ns: Option<u64>,
}

/// New utilization samples of one GPU.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuRecord {
    pub gpu: u32,
    #[serde(default)]
    pub uuid: String,
    #[serde(default)]
    pub model: String,
    /// `"nvml"` or `"simulated"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// `(end_ns, period_ns, util)` triples.
    pub samples: Vec<(u64, u64, f64)>,
}

impl GpuRecord {
    pub fn new(info: &GpuInfo, source: &str, samples: &[UtilSample]) -> Self {
        Self {
            gpu: info.index,
            uuid: info.uuid.clone(),
            model: info.model.clone(),
            source: Some(source.to_string()),
            samples: samples
                .iter()
                .map(|s| (s.end_ns, s.period_ns, s.util))
                .collect(),
        }
    }

    pub fn util_samples(&self) -> Vec<UtilSample> {
        self.samples
            .iter()
            .map(|&(end_ns, period_ns, util)| UtilSample {
                end_ns,
                period_ns,
                util,
            })
            .collect()
    }
}

/// Feeder and worker data, as far as retained.
#[derive(Debug, Default)]
struct Timeline {
    /// Feeder state changes, ts non-decreasing, consecutive states distinct.
    feeder: VecDeque<(u64, u32)>,
    feeder_wm: Option<u64>,
    /// Worker slices, sorted and non-overlapping.
    workers: VecDeque<WorkerSlice>,
    worker_wm: Option<u64>,
}

/// Classified feeder time of one period, in ns, before fitting into idle.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Raw {
    io_feeder: f64,
    io_workers: f64,
    preprocess: f64,
    host: f64,
    other: f64,
}

impl Timeline {
    fn watermark(&self) -> Option<u64> {
        Some(self.feeder_wm?.min(self.worker_wm?))
    }

    /// Feeder time in `[t0, t1)` per state, index `NUM_STATES` = unknown.
    fn feeder_time(&self, t0: u64, t1: u64) -> [f64; NUM_STATES + 1] {
        let slot = |state: u32| (state as usize).min(NUM_STATES);
        let mut acc = [0.0; NUM_STATES + 1];
        let i = self.feeder.partition_point(|&(ts, _)| ts <= t0);
        let (mut t, mut state) = match i.checked_sub(1) {
            Some(j) => (t0, self.feeder[j].1),
            None => (t0, STATE_UNKNOWN),
        };
        for &(ts, next) in self.feeder.range(i..) {
            if ts >= t1 {
                break;
            }
            acc[slot(state)] += (ts - t) as f64;
            t = ts;
            state = next;
        }
        acc[slot(state)] += (t1 - t) as f64;
        acc
    }

    /// Worker time in `[t0, t1)` pro-rated from overlapping slices: (covered wall ns, per state).
    fn worker_time(&self, t0: u64, t1: u64) -> (f64, [f64; NUM_STATES]) {
        let mut covered = 0.0;
        let mut acc = [0.0; NUM_STATES];
        let i = self.workers.partition_point(|s| s.end_ns <= t0);
        for s in self.workers.range(i..) {
            if s.start_ns >= t1 {
                break;
            }
            let overlap = s.end_ns.min(t1) - s.start_ns.max(t0);
            let frac = overlap as f64 / (s.end_ns - s.start_ns) as f64;
            covered += overlap as f64;
            for (a, &v) in acc.iter_mut().zip(&s.state_ns) {
                *a += v as f64 * frac;
            }
        }
        (covered, acc)
    }

    /// Classifies the feeder's time in `[t0, t1)` (see the module docs). Sums to `t1 - t0`.
    fn classify(&self, t0: u64, t1: u64) -> Raw {
        let f = self.feeder_time(t0, t1);
        let ipc = f[STATE_IPC_WAIT as usize];
        let (covered, w) = self.worker_time(t0, t1);
        let storage = w[STATE_STORAGE_WAIT as usize];
        let cpu = w[STATE_ON_CPU as usize];
        let active = storage + cpu;
        let (mut io_workers, mut preprocess, mut unexplained) = (0.0, 0.0, ipc);
        if covered > 0.0 && active > 0.0 {
            let explained = ipc * (active / covered).min(1.0);
            io_workers = explained * (storage / active);
            preprocess = explained * (cpu / active);
            unexplained = ipc - explained;
        }
        Raw {
            io_feeder: f[STATE_STORAGE_WAIT as usize],
            io_workers,
            preprocess,
            host: f[STATE_ON_CPU as usize],
            other: f[STATE_OTHER_WAIT as usize] + f[NUM_STATES] + unexplained.max(0.0),
        }
    }
}

/// Fits classified time into `idle` ns: returns (causes, io_feeder part of io).
fn allocate(raw: Raw, idle: f64, allocation: Allocation) -> ([f64; NUM_CAUSES], f64) {
    let io = raw.io_feeder + raw.io_workers;
    let feeder_share = if io > 0.0 { raw.io_feeder / io } else { 0.0 };
    let mut c = [0.0; NUM_CAUSES];
    match allocation {
        Allocation::Priority => {
            let data = io + raw.preprocess;
            let scale = if data > idle { idle / data } else { 1.0 };
            c[CAUSE_IO] = io * scale;
            c[CAUSE_PREPROCESS] = raw.preprocess * scale;
            let rest = (idle - c[CAUSE_IO] - c[CAUSE_PREPROCESS]).max(0.0);
            c[CAUSE_HOST] = raw.host.min(rest);
            c[CAUSE_OTHER] = (rest - c[CAUSE_HOST]).max(0.0);
        }
        Allocation::Proportional => {
            let total = io + raw.preprocess + raw.host + raw.other;
            if total > 0.0 {
                let scale = idle / total;
                c = [
                    io * scale,
                    raw.preprocess * scale,
                    raw.host * scale,
                    raw.other * scale,
                ];
            } else {
                c[CAUSE_OTHER] = idle;
            }
        }
    }
    (c, c[CAUSE_IO] * feeder_share)
}

/// Per-GPU state: queued samples and running sums (ns).
#[derive(Debug, Default)]
struct GpuState {
    /// Samples waiting for the watermark, in order, non-overlapping.
    pending: VecDeque<UtilSample>,
    /// End of the last sample accepted (queued or processed).
    accepted_until: Option<u64>,
    wall_ns: f64,
    busy_ns: f64,
    idle_ns: [f64; NUM_CAUSES],
    io_feeder_ns: f64,
    samples: u64,
    dropped: u64,
}

impl GpuState {
    fn attribute(&mut self, s: UtilSample, timeline: &Timeline, allocation: Allocation) {
        let (t0, t1) = (s.start_ns(), s.end_ns);
        let period = (t1 - t0) as f64;
        let busy = s.util * period;
        let idle = period - busy;
        let (causes, io_feeder) = allocate(timeline.classify(t0, t1), idle, allocation);
        self.wall_ns += period;
        self.busy_ns += busy;
        for (acc, c) in self.idle_ns.iter_mut().zip(causes) {
            *acc += c;
        }
        self.io_feeder_ns += io_feeder;
        self.samples += 1;
    }

    fn totals(&self, gpu: u32) -> GpuTotals {
        GpuTotals {
            gpu,
            wall_s: self.wall_ns * 1e-9,
            busy_s: self.busy_ns * 1e-9,
            idle_s: self.idle_ns.map(|ns| ns * 1e-9),
            io_feeder_s: self.io_feeder_ns * 1e-9,
            samples: self.samples,
            dropped_samples: self.dropped,
        }
    }
}

/// The streaming attribution engine (see the module docs).
#[derive(Debug, Default)]
pub struct Attributor {
    config: AttributorConfig,
    timeline: Timeline,
    gpus: BTreeMap<u32, GpuState>,
}

impl Attributor {
    pub fn new(config: AttributorConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    pub fn config(&self) -> &AttributorConfig {
        &self.config
    }

    /// Records a feeder state change. Events must come in time order; an earlier timestamp is
    /// moved up to the previous event's. Push the feeder's state at attach time first (time before
    /// the first event counts as unknown).
    pub fn push_feeder_event(&mut self, ts_ns: u64, state: u32) {
        let state = if (state as usize) < NUM_STATES {
            state
        } else {
            STATE_UNKNOWN
        };
        let feeder = &mut self.timeline.feeder;
        let ts = match feeder.back() {
            Some(&(last_ts, last_state)) => {
                let ts = ts_ns.max(last_ts);
                if state == last_state {
                    // No change.
                } else if ts == last_ts && feeder.len() >= 2 && feeder[feeder.len() - 2].1 == state
                {
                    // A zero-length state: drop it, the previous state simply continues.
                    feeder.pop_back();
                } else if ts == last_ts {
                    feeder.back_mut().expect("non-empty").1 = state;
                } else {
                    feeder.push_back((ts, state));
                }
                ts
            }
            None => {
                feeder.push_back((ts_ns, state));
                ts_ns
            }
        };
        self.timeline.feeder_wm = Some(self.timeline.feeder_wm.map_or(ts, |w| w.max(ts)));
    }

    /// Declares that every feeder event before `ts_ns` has been pushed, then processes what became
    /// ready.
    pub fn feeder_complete_until(&mut self, ts_ns: u64) {
        let wm = &mut self.timeline.feeder_wm;
        *wm = Some(wm.map_or(ts_ns, |w| w.max(ts_ns)));
        self.process();
    }

    /// Records a worker slice and processes what became ready. Slices must come in time order and
    /// be pushed every poll, even with no workers (all zeros): their end is the worker watermark.
    /// A slice overlapping the previous one is clipped (its times pro-rated); an empty one only
    /// advances the watermark.
    pub fn push_worker_slice(&mut self, slice: WorkerSlice) {
        let t = &mut self.timeline;
        let prev_end = t.workers.back().map_or(0, |s| s.end_ns);
        let start = slice.start_ns.max(prev_end);
        if slice.end_ns > start {
            let mut s = slice;
            if start > slice.start_ns {
                let keep = (slice.end_ns - start) as f64 / (slice.end_ns - slice.start_ns) as f64;
                s.state_ns = slice.state_ns.map(|v| (v as f64 * keep) as u64);
                s.start_ns = start;
            }
            t.workers.push_back(s);
        }
        t.worker_wm = Some(t.worker_wm.map_or(slice.end_ns, |w| w.max(slice.end_ns)));
        self.process();
    }

    /// Queues utilization samples of one GPU and processes what is ready. Samples should be in
    /// time order; the part of a sample before the end of an earlier one is clipped off. An empty
    /// slice registers the GPU (it then appears in [`totals`](Self::totals) with zero wall time).
    pub fn push_gpu_samples(&mut self, gpu: u32, samples: &[UtilSample]) {
        let st = self.gpus.entry(gpu).or_default();
        for s in samples {
            let from = st.accepted_until.unwrap_or(0).max(s.start_ns());
            if s.period_ns == 0 || !s.util.is_finite() || s.end_ns <= from {
                st.dropped += 1;
                continue;
            }
            st.pending.push_back(UtilSample {
                end_ns: s.end_ns,
                period_ns: s.end_ns - from,
                util: s.util.clamp(0.0, 1.0),
            });
            st.accepted_until = Some(s.end_ns);
        }
        self.process();
    }

    /// Applies one record (the same call sequence the live daemon made when it wrote it).
    pub fn apply(&mut self, record: &AttributionRecord) {
        match record {
            AttributionRecord::Feeder(f) => {
                for &(ts, state) in &f.events {
                    self.push_feeder_event(ts, state);
                }
                match f.until_ns {
                    Some(until) => self.feeder_complete_until(until),
                    None => self.process(),
                }
            }
            AttributionRecord::WorkerSlice(s) => self.push_worker_slice(*s),
            AttributionRecord::Gpu(g) => self.push_gpu_samples(g.gpu, &g.util_samples()),
        }
    }

    /// The time up to which feeder and worker data are complete, if known.
    pub fn watermark_ns(&self) -> Option<u64> {
        self.timeline.watermark()
    }

    /// Attributes every queued sample now, whatever the watermark (end of a run).
    pub fn flush(&mut self) {
        let allocation = self.config.allocation;
        for st in self.gpus.values_mut() {
            while let Some(s) = st.pending.pop_front() {
                st.attribute(s, &self.timeline, allocation);
            }
        }
    }

    /// Totals per GPU, by GPU index.
    pub fn totals(&self) -> Vec<GpuTotals> {
        self.gpus.iter().map(|(&gpu, st)| st.totals(gpu)).collect()
    }

    /// Buffered items: (feeder events, worker slices, queued GPU samples).
    pub fn buffered(&self) -> (usize, usize, usize) {
        (
            self.timeline.feeder.len(),
            self.timeline.workers.len(),
            self.gpus.values().map(|g| g.pending.len()).sum(),
        )
    }

    /// Attributes ready samples, then drops timeline data older than the retention horizon.
    fn process(&mut self) {
        let wm = self.timeline.watermark();
        let retention = self.config.retention_ns;
        let allocation = self.config.allocation;
        for st in self.gpus.values_mut() {
            let newest = st.accepted_until.unwrap_or(0);
            while let Some(&s) = st.pending.front() {
                let ready = wm.is_some_and(|w| s.end_ns <= w)
                    || s.end_ns.saturating_add(retention) <= newest;
                if !ready {
                    break;
                }
                st.pending.pop_front();
                st.attribute(s, &self.timeline, allocation);
            }
        }

        let t = &mut self.timeline;
        let latest = t.feeder_wm.unwrap_or(0).max(t.worker_wm.unwrap_or(0));
        let cut = latest.saturating_sub(retention);
        // Keep the last feeder event at or before the cut: it gives the state at the cut.
        while t.feeder.len() >= 2 && t.feeder[1].0 <= cut {
            t.feeder.pop_front();
        }
        while t.workers.front().is_some_and(|s| s.end_ns <= cut) {
            t.workers.pop_front();
        }
    }
}

/// What a verdict can say beyond the totals.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VerdictContext {
    /// The GPU is the simulated one.
    pub simulated: bool,
    /// Block device most of the job's reads went to, e.g. "vda".
    pub read_device: Option<String>,
    /// 99th percentile of the job's read latency, seconds.
    pub read_p99_s: Option<f64>,
    /// Directory the job read most from.
    pub hottest_path: Option<String>,
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
    let _ = write!(
        line,
        "GPU {} idle {} of {}: ",
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
                let _ = write!(reads, " p99 {}", format_latency(p99));
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
fn format_percent(p: f64) -> String {
    if p > 0.0 && p < 0.95 {
        format!("{p:.1}%")
    } else {
        format!("{p:.0}%")
    }
}

/// `12.3s`, `10m12s`, `2h05m09s`.
fn format_duration(s: f64) -> String {
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
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;
    const ON: u32 = STATE_ON_CPU;
    const STO: u32 = STATE_STORAGE_WAIT;
    const IPC: u32 = STATE_IPC_WAIT;
    const OTH: u32 = STATE_OTHER_WAIT;

    fn sample(start_ms: u64, end_ms: u64, util: f64) -> UtilSample {
        UtilSample {
            end_ns: end_ms * MS,
            period_ns: (end_ms - start_ms) * MS,
            util,
        }
    }

    fn slice(start_ms: u64, end_ms: u64, state_ms: [u64; 4]) -> WorkerSlice {
        WorkerSlice {
            start_ns: start_ms * MS,
            end_ns: end_ms * MS,
            state_ns: state_ms.map(|v| v * MS),
        }
    }

    /// Runs a whole scenario: feeder events (ms), worker slices, samples of GPU 0.
    fn run(
        allocation: Allocation,
        feeder: &[(u64, u32)],
        workers: &[WorkerSlice],
        samples: &[UtilSample],
    ) -> GpuTotals {
        let mut a = Attributor::new(AttributorConfig {
            allocation,
            ..AttributorConfig::default()
        });
        for &(t, s) in feeder {
            a.push_feeder_event(t * MS, s);
        }
        for &w in workers {
            a.push_worker_slice(w);
        }
        a.push_gpu_samples(0, samples);
        a.flush();
        a.totals().remove(0)
    }

    fn ms(s: f64) -> f64 {
        (s * 1e3 * 1e6).round() / 1e6
    }

    fn causes_ms(t: &GpuTotals) -> [f64; 4] {
        t.idle_s.map(ms)
    }

    fn idle_workers(end_ms: u64) -> Vec<WorkerSlice> {
        vec![slice(0, end_ms, [0; 4])]
    }

    #[test]
    fn feeder_storage_wait_is_io() {
        // 100 ms period, GPU 20% busy; feeder reads 80 ms, on CPU 20 ms.
        let t = run(
            Allocation::Priority,
            &[(0, STO), (80, ON)],
            &idle_workers(100),
            &[sample(0, 100, 0.2)],
        );
        assert_eq!(causes_ms(&t), [80.0, 0.0, 0.0, 0.0]);
        assert_eq!(ms(t.io_feeder_s), 80.0);
        assert_eq!(ms(t.busy_s), 20.0);
        assert_eq!(ms(t.wall_s), 100.0);
        assert_eq!(t.samples, 1);
    }

    #[test]
    fn feeder_on_cpu_is_host_after_data_waits() {
        // Idle 50 ms: 30 ms of reads fit entirely, host takes the remaining 20 of its 70.
        let t = run(
            Allocation::Priority,
            &[(0, STO), (30, ON)],
            &idle_workers(100),
            &[sample(0, 100, 0.5)],
        );
        assert_eq!(causes_ms(&t), [30.0, 0.0, 20.0, 0.0]);
        // Proportional: everything scaled by idle/period = 0.5.
        let t = run(
            Allocation::Proportional,
            &[(0, STO), (30, ON)],
            &idle_workers(100),
            &[sample(0, 100, 0.5)],
        );
        assert_eq!(causes_ms(&t), [15.0, 0.0, 35.0, 0.0]);
    }

    #[test]
    fn other_wait_and_unknown_are_other() {
        // Unknown before 20 ms, other_wait 20..60, on CPU 60..100; GPU fully idle.
        let t = run(
            Allocation::Priority,
            &[(20, OTH), (60, ON)],
            &idle_workers(100),
            &[sample(0, 100, 0.0)],
        );
        assert_eq!(causes_ms(&t), [0.0, 0.0, 40.0, 60.0]);
        // Explicit unknown (e.g. feeder exited), and out-of-range states mean unknown too.
        let t = run(
            Allocation::Priority,
            &[(0, ON), (50, STATE_UNKNOWN), (70, 17)],
            &idle_workers(100),
            &[sample(0, 100, 0.0)],
        );
        assert_eq!(causes_ms(&t), [0.0, 0.0, 50.0, 50.0]);
    }

    #[test]
    fn ipc_wait_splits_by_worker_activity() {
        // Feeder waits for a batch the whole period; workers: 60 ms storage, 20 ms CPU in each
        // 50 ms slice (several workers): active >= covered, so the wait is fully explained.
        let workers = [
            slice(0, 50, [20, 60, 5, 0]),
            slice(50, 100, [20, 60, 0, 30]),
        ];
        let t = run(
            Allocation::Priority,
            &[(0, IPC)],
            &workers,
            &[sample(0, 100, 0.0)],
        );
        assert_eq!(causes_ms(&t), [75.0, 25.0, 0.0, 0.0]);
        assert_eq!(t.io_feeder_s, 0.0);
    }

    #[test]
    fn ipc_wait_with_idle_workers_is_other() {
        // Workers blocked on their index queues (ipc_wait) while the feeder waits: not data.
        let workers = [slice(0, 100, [0, 0, 400, 0])];
        let t = run(
            Allocation::Priority,
            &[(0, IPC)],
            &workers,
            &[sample(0, 100, 0.0)],
        );
        assert_eq!(causes_ms(&t), [0.0, 0.0, 0.0, 100.0]);
        // No worker data at all: the same.
        let t = run(
            Allocation::Priority,
            &[(0, IPC)],
            &[],
            &[sample(0, 100, 0.0)],
        );
        assert_eq!(causes_ms(&t), [0.0, 0.0, 0.0, 100.0]);
        // Workers busy a quarter of a worker-equivalent: a quarter of the wait is explained.
        let workers = [slice(0, 100, [25, 0, 300, 0])];
        let t = run(
            Allocation::Priority,
            &[(0, IPC)],
            &workers,
            &[sample(0, 100, 0.0)],
        );
        assert_eq!(causes_ms(&t), [0.0, 25.0, 0.0, 75.0]);
    }

    #[test]
    fn worker_slices_are_pro_rated() {
        // GPU period 50..150 sees half of each slice: first 100 ms all storage, second all CPU.
        let workers = [
            slice(0, 100, [0, 100, 0, 0]),
            slice(100, 200, [300, 0, 0, 0]),
        ];
        let t = run(
            Allocation::Priority,
            &[(0, IPC)],
            &workers,
            &[sample(50, 150, 0.0)],
        );
        // storage 50, cpu 150 -> 1:3.
        assert_eq!(causes_ms(&t), [25.0, 75.0, 0.0, 0.0]);
    }

    #[test]
    fn data_waits_exceeding_idle_are_scaled_down() {
        // Feeder: 40 storage, 40 ipc (workers all CPU), 20 CPU; idle only 40 ms.
        let workers = [slice(0, 100, [100, 0, 0, 0])];
        let t = run(
            Allocation::Priority,
            &[(0, STO), (40, IPC), (80, ON)],
            &workers,
            &[sample(0, 100, 0.6)],
        );
        assert_eq!(causes_ms(&t), [20.0, 20.0, 0.0, 0.0]);
        assert_eq!(ms(t.io_feeder_s), 20.0);
        let sum: f64 = t.idle_s.iter().sum::<f64>() + t.busy_s;
        assert!((sum - t.wall_s).abs() < 1e-12);
    }

    #[test]
    fn state_changes_inside_a_period_are_exact() {
        // Two periods; the feeder switches state mid-period.
        let t = run(
            Allocation::Priority,
            &[(0, ON), (30, STO), (130, ON), (150, OTH)],
            &idle_workers(200),
            &[sample(0, 100, 0.0), sample(100, 200, 0.0)],
        );
        assert_eq!(causes_ms(&t), [100.0, 0.0, 50.0, 50.0]);
    }

    #[test]
    fn streaming_waits_for_the_watermark() {
        let mut a = Attributor::new(AttributorConfig::default());
        a.push_feeder_event(0, STO);
        a.push_gpu_samples(0, &[sample(0, 100, 0.0), sample(100, 200, 0.0)]);
        assert_eq!(a.totals()[0].samples, 0, "no worker data yet");
        a.push_worker_slice(slice(0, 150, [0; 4]));
        assert_eq!(
            a.watermark_ns(),
            Some(0),
            "feeder watermark is its last event"
        );
        a.feeder_complete_until(150 * MS);
        assert_eq!(a.watermark_ns(), Some(150 * MS));
        assert_eq!(a.totals()[0].samples, 1);
        a.feeder_complete_until(300 * MS);
        assert_eq!(a.totals()[0].samples, 1, "workers only cover 150 ms");
        a.push_worker_slice(slice(150, 250, [0; 4]));
        let t = &a.totals()[0];
        assert_eq!(t.samples, 2);
        assert_eq!(causes_ms(t), [200.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn memory_is_bounded_and_stale_samples_are_forced() {
        let cfg = AttributorConfig {
            retention_ns: 1000 * MS,
            ..AttributorConfig::default()
        };
        let mut a = Attributor::new(cfg);
        // 100 s of 1 ms feeder flips and 100 ms worker slices, with no GPU samples.
        for i in 0..100_000u64 {
            a.push_feeder_event(i * MS, if i % 2 == 0 { ON } else { IPC });
            if i % 100 == 99 {
                a.push_worker_slice(slice(i - 99, i + 1, [50, 0, 0, 0]));
                a.feeder_complete_until((i + 1) * MS);
            }
        }
        let (f, w, g) = a.buffered();
        assert!(f <= 1002, "feeder events retained: {f}");
        assert!(w <= 11, "worker slices retained: {w}");
        assert_eq!(g, 0);

        // A GPU whose samples run ahead of a stalled watermark: only the last retention's worth
        // stays queued.
        let samples: Vec<UtilSample> = (0..1000)
            .map(|i| sample(100_000 + i * 10, 100_010 + i * 10, 0.5))
            .collect();
        a.push_gpu_samples(3, &samples);
        let (_, _, g) = a.buffered();
        assert!(g <= 101, "queued samples: {g}");
        a.flush();
        let t = &a.totals()[0];
        assert_eq!(t.gpu, 3);
        assert_eq!(t.samples, 1000);
        assert_eq!(a.buffered().2, 0);
    }

    #[test]
    fn bad_samples_are_dropped_or_clipped() {
        let mut a = Attributor::new(AttributorConfig::default());
        a.push_feeder_event(0, ON);
        a.push_gpu_samples(
            1,
            &[
                sample(0, 100, f64::NAN),
                UtilSample {
                    end_ns: 5,
                    period_ns: 0,
                    util: 0.5,
                },
                sample(0, 100, 2.0),  // clamped to 1
                sample(50, 150, 0.0), // clipped to 100..150
                sample(20, 80, 0.0),  // entirely before: dropped
                UtilSample {
                    end_ns: 200 * MS,
                    period_ns: u64::MAX, // starts at 0: clipped to 150..200
                    util: 0.0,
                },
            ],
        );
        a.flush();
        let t = &a.totals()[0];
        assert_eq!(t.dropped_samples, 3);
        assert_eq!(t.samples, 3);
        assert_eq!(ms(t.wall_s), 200.0);
        assert_eq!(ms(t.busy_s), 100.0);
        assert_eq!(causes_ms(t), [0.0, 0.0, 100.0, 0.0]);
    }

    #[test]
    fn empty_push_registers_a_gpu() {
        let mut a = Attributor::new(AttributorConfig::default());
        a.push_gpu_samples(5, &[]);
        assert_eq!(
            a.totals(),
            vec![GpuTotals {
                gpu: 5,
                ..GpuTotals::default()
            }]
        );
    }

    #[test]
    fn out_of_order_and_repeated_events_are_tolerated() {
        let mut a = Attributor::new(AttributorConfig::default());
        a.push_feeder_event(10 * MS, ON);
        a.push_feeder_event(10 * MS, ON);
        a.push_feeder_event(50 * MS, STO);
        a.push_feeder_event(40 * MS, OTH); // late: moved to 50 ms, replaces STO there
        a.push_feeder_event(50 * MS, ON); // back to ON at the same instant: merged away
        a.push_feeder_event(90 * MS, IPC);
        assert_eq!(a.buffered().0, 2);
        // Overlapping worker slice is clipped and pro-rated.
        a.push_worker_slice(slice(0, 100, [0; 4]));
        a.push_worker_slice(slice(50, 150, [0, 100, 0, 0]));
        a.push_gpu_samples(0, &[sample(0, 100, 0.0)]);
        a.flush();
        // 0..10 unknown, 10..90 on CPU, 90..100 ipc with no worker activity in 0..100.
        assert_eq!(causes_ms(&a.totals()[0]), [0.0, 0.0, 80.0, 20.0]);
    }

    #[test]
    fn records_round_trip_through_json() {
        let recs = vec![
            AttributionRecord::Feeder(FeederRecord {
                events: vec![(1, 0), (2, 3)],
                until_ns: None,
            }),
            AttributionRecord::Feeder(FeederRecord {
                events: vec![],
                until_ns: Some(9),
            }),
            AttributionRecord::WorkerSlice(slice(0, 1, [1, 2, 3, 4])),
            AttributionRecord::Gpu(GpuRecord::new(
                &GpuInfo {
                    index: 2,
                    uuid: "GPU-x".into(),
                    model: "m".into(),
                },
                "nvml",
                &[sample(0, 100, 0.25)],
            )),
        ];
        let lines: Vec<String> = recs
            .iter()
            .map(|r| serde_json::to_string(r).unwrap())
            .collect();
        assert_eq!(lines[0], r#"{"type":"feeder","events":[[1,0],[2,3]]}"#);
        assert_eq!(
            lines[2],
            r#"{"type":"worker_slice","start_ns":0,"end_ns":1000000,"state_ns":[1000000,2000000,3000000,4000000]}"#
        );
        assert_eq!(
            lines[3],
            r#"{"type":"gpu","gpu":2,"uuid":"GPU-x","model":"m","source":"nvml","samples":[[100000000,100000000,0.25]]}"#
        );
        for (line, rec) in lines.iter().zip(&recs) {
            let back: AttributionRecord = serde_json::from_str(line).unwrap();
            assert_eq!(&back, rec);
        }
        // The minimal gpu line from the brief parses too.
        let g: AttributionRecord = serde_json::from_str(
            r#"{"type":"gpu","gpu":0,"uuid":"u","model":"m","samples":[[5,5,1.0]]}"#,
        )
        .unwrap();
        assert!(matches!(
            g,
            AttributionRecord::Gpu(GpuRecord { source: None, .. })
        ));
    }

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

    // ---- property tests ----

    /// A generated scenario (times in ns from an arbitrary base).
    #[derive(Clone, Debug)]
    struct Scenario {
        feeder: Vec<(u64, u32)>,
        workers: Vec<WorkerSlice>,
        gpus: Vec<Vec<UtilSample>>,
    }

    const BASE: u64 = 5_000_000_000;

    fn scenario() -> impl Strategy<Value = Scenario> {
        let feeder = prop::collection::vec(
            (
                0u64..40 * MS,
                prop_oneof![4 => 0u32..4, 1 => Just(STATE_UNKNOWN)],
            ),
            0..80,
        );
        let workers = prop::collection::vec(
            (
                1u64..200 * MS,
                prop_oneof![8 => Just(0u64), 1 => 0u64..100 * MS],
                prop::array::uniform4(0u64..600 * MS),
            ),
            0..40,
        );
        let gpu = prop::collection::vec(
            (
                1u64..300 * MS,
                prop_oneof![6 => Just(0u64), 1 => 0u64..200 * MS],
                prop_oneof![3 => 0.0f64..=1.0, 1 => Just(0.0), 1 => Just(1.0)],
            ),
            0..40,
        );
        (feeder, workers, prop::collection::vec(gpu, 1..4)).prop_map(|(f, w, g)| {
            let mut t = BASE;
            let feeder = f
                .into_iter()
                .map(|(dt, s)| {
                    t += dt;
                    (t, s)
                })
                .collect();
            let mut t = BASE - 100 * MS;
            let workers = w
                .into_iter()
                .map(|(len, gap, st)| {
                    let start = t + gap;
                    t = start + len;
                    WorkerSlice {
                        start_ns: start,
                        end_ns: t,
                        state_ns: st,
                    }
                })
                .collect();
            let gpus = g
                .into_iter()
                .map(|samples| {
                    let mut t = BASE - 50 * MS;
                    samples
                        .into_iter()
                        .map(|(period, gap, util)| {
                            t += gap + period;
                            UtilSample {
                                end_ns: t,
                                period_ns: period,
                                util,
                            }
                        })
                        .collect()
                })
                .collect();
            Scenario {
                feeder,
                workers,
                gpus,
            }
        })
    }

    /// Pushes everything in arrival order: feeder events at their time, worker slices at their
    /// end, GPU samples `lag` after their end; then flushes.
    fn stream(sc: &Scenario, cfg: AttributorConfig, lag: u64) -> Attributor {
        enum Item<'a> {
            Feeder(u64, u32),
            Worker(WorkerSlice),
            Gpu(u32, &'a UtilSample),
        }
        let mut items: Vec<(u64, usize, Item)> = Vec::new();
        for &(t, s) in &sc.feeder {
            items.push((t, 0, Item::Feeder(t, s)));
        }
        for &w in &sc.workers {
            items.push((w.end_ns, 1, Item::Worker(w)));
        }
        for (g, samples) in sc.gpus.iter().enumerate() {
            for s in samples {
                items.push((s.end_ns + lag, 2, Item::Gpu(g as u32, s)));
            }
        }
        items.sort_by_key(|&(t, k, _)| (t, k));
        let mut a = Attributor::new(cfg);
        for g in 0..sc.gpus.len() {
            a.push_gpu_samples(g as u32, &[]); // a job GPU is known before its first sample
        }
        for (t, _, item) in items {
            match item {
                Item::Feeder(ts, s) => a.push_feeder_event(ts, s),
                Item::Worker(w) => {
                    a.feeder_complete_until(t);
                    a.push_worker_slice(w);
                }
                Item::Gpu(g, s) => a.push_gpu_samples(g, std::slice::from_ref(s)),
            }
        }
        a.flush();
        a
    }

    /// Everything up front, then the samples, then flush.
    fn batch(sc: &Scenario, cfg: AttributorConfig) -> Attributor {
        let mut a = Attributor::new(cfg);
        for &(t, s) in &sc.feeder {
            a.push_feeder_event(t, s);
        }
        for &w in &sc.workers {
            a.push_worker_slice(w);
        }
        for (g, samples) in sc.gpus.iter().enumerate() {
            a.push_gpu_samples(g as u32, samples);
        }
        a.flush();
        a
    }

    fn check_invariants(totals: &[GpuTotals]) -> Result<(), TestCaseError> {
        for t in totals {
            let idle = t.idle_total_s();
            let tol = 1e-9 * t.wall_s.max(1e-9);
            prop_assert!(
                (t.busy_s + idle - t.wall_s).abs() <= tol,
                "conservation: {t:?}"
            );
            prop_assert!(t.busy_s >= 0.0 && t.busy_s <= t.wall_s + tol, "{t:?}");
            for &c in &t.idle_s {
                prop_assert!(c >= 0.0, "negative cause: {t:?}");
                prop_assert!(c <= idle + tol, "cause exceeds idle: {t:?}");
            }
            prop_assert!(t.io_feeder_s >= 0.0 && t.io_feeder_s <= t.idle_s[CAUSE_IO] + tol);
        }
        Ok(())
    }

    fn assert_close(a: &[GpuTotals], b: &[GpuTotals]) -> Result<(), TestCaseError> {
        prop_assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            let tol = 1e-9 * x.wall_s.max(1e-9);
            prop_assert_eq!(x.gpu, y.gpu);
            prop_assert_eq!(x.samples, y.samples);
            prop_assert!((x.wall_s - y.wall_s).abs() <= tol && (x.busy_s - y.busy_s).abs() <= tol);
            for (c, d) in x.idle_s.iter().zip(&y.idle_s) {
                prop_assert!((c - d).abs() <= tol, "{x:?} vs {y:?}");
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: None, // no regression files in the source tree
            ..ProptestConfig::default()
        })]

        #[test]
        fn conservation_holds(sc in scenario(), proportional in any::<bool>(), retention in prop_oneof![Just(DEFAULT_RETENTION_NS), 50 * MS..2000 * MS]) {
            let allocation = if proportional { Allocation::Proportional } else { Allocation::Priority };
            let cfg = AttributorConfig { allocation, retention_ns: retention };
            for a in [stream(&sc, cfg, 300 * MS), batch(&sc, cfg)] {
                let totals = a.totals();
                check_invariants(&totals)?;
                let accepted: u64 = totals.iter().map(|t| t.samples + t.dropped_samples).sum();
                prop_assert_eq!(accepted, sc.gpus.iter().map(|g| g.len() as u64).sum::<u64>());
            }
        }

        #[test]
        fn streaming_equals_batch(sc in scenario(), proportional in any::<bool>(), lag in 0u64..2000 * MS) {
            let allocation = if proportional { Allocation::Proportional } else { Allocation::Priority };
            let cfg = AttributorConfig { allocation, retention_ns: u64::MAX / 4 };
            assert_close(&stream(&sc, cfg, lag).totals(), &batch(&sc, cfg).totals())?;
        }

        #[test]
        fn priority_never_exceeds_feeder_time(sc in scenario()) {
            // Per period: each cause is at most the feeder time classified into it.
            let a = batch(&sc, AttributorConfig::default());
            for samples in &sc.gpus {
                let mut last = 0;
                for s in samples {
                    let t0 = s.start_ns().max(last);
                    if s.end_ns <= t0 { continue; }
                    last = s.end_ns;
                    let raw = a.timeline.classify(t0, s.end_ns);
                    let period = (s.end_ns - t0) as f64;
                    let sum = raw.io_feeder + raw.io_workers + raw.preprocess + raw.host + raw.other;
                    prop_assert!((sum - period).abs() <= 1e-6 * period.max(1.0), "{raw:?} vs {period}");
                    let idle = period * (1.0 - s.util);
                    let (c, _) = allocate(raw, idle, Allocation::Priority);
                    let eps = 1e-9 * period;
                    prop_assert!(c[CAUSE_IO] <= raw.io_feeder + raw.io_workers + eps);
                    prop_assert!(c[CAUSE_PREPROCESS] <= raw.preprocess + eps);
                    prop_assert!(c[CAUSE_HOST] <= raw.host + eps);
                    prop_assert!(c[CAUSE_OTHER] <= raw.other + eps);
                    prop_assert!((c.iter().sum::<f64>() - idle).abs() <= eps);
                }
            }
        }
    }
}
