//! The attribution engine of one rank: GPU idle time to causes, **io**, **preprocess**, **host**,
//! **other**.
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
//! `stallmon report` relies on (see `attribution::Attribution::apply`).

use std::collections::{BTreeMap, VecDeque};

use monitor_common::{
    NUM_STATES, STATE_CPU_WAIT, STATE_IPC_WAIT, STATE_ON_CPU, STATE_OTHER_WAIT, STATE_STORAGE_WAIT,
};
use serde::{Deserialize, Serialize};

use crate::gpu::UtilSample;

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
        // Workers that want the CPU count as computing, whether they have it (on_cpu) or are
        // waiting for it (cpu_wait): either way the batch waits for CPU work.
        let cpu = w[STATE_ON_CPU as usize] + w[STATE_CPU_WAIT as usize];
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
            other: f[STATE_OTHER_WAIT as usize]
                + f[STATE_CPU_WAIT as usize]
                + f[NUM_STATES]
                + unexplained.max(0.0),
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

    /// The time up to which feeder and worker data are complete, if known.
    #[cfg(test)]
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
    #[cfg(test)]
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

#[cfg(test)]
mod tests;
