//! Prometheus exposition. The kernel already aggregates (log2 histograms, counters), so instead
//! of re-observing values into client-side metrics we implement a `prometheus::core::Collector`
//! that turns the latest snapshot into metric families at scrape time, the way ebpf_exporter
//! decodes its maps. Label sets are bounded: no pid labels (per-process detail goes to the record
//! file).
use std::sync::{Arc, RwLock};

use monitor_common::{DROP_NAMES, FD_KIND_NAMES, ROLE_NAMES, STATE_NAMES};
use prometheus::{
    Encoder, Registry, TextEncoder,
    core::{Collector, Desc},
    proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::{collector::Snapshot, hist::Log2Hist};

/// GPU figures for the exposition, one per GPU (filled by the GPU sampler and attribution).
#[derive(Clone, Debug, Default)]
pub struct GpuMetrics {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub utilization: Option<f64>,
    pub busy_s: f64,
    /// Idle seconds by cause: io, preprocess, host, other.
    pub idle_s: [f64; 4],
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub temperature_c: Option<f64>,
    pub power_w: Option<f64>,
    pub pcie_rx_bytes: Option<u64>,
    pub pcie_tx_bytes: Option<u64>,
    pub throttle_reasons: Vec<(&'static str, bool)>,
    pub stale: bool,
}

pub const CAUSES: [&str; 4] = ["io", "preprocess", "host", "other"];

/// What `/metrics` shows: the latest snapshot and GPU view.
#[derive(Default)]
pub struct MetricsState {
    pub job_name: String,
    pub snapshot: Option<Snapshot>,
    pub gpus: Vec<GpuMetrics>,
    /// "nvml", "simulated", or None when GPU attribution is disabled.
    pub gpu_source: Option<&'static str>,
}

pub type SharedState = Arc<RwLock<MetricsState>>;

struct Family {
    mf: MetricFamily,
}

impl Family {
    fn new(name: &str, help: &str, t: MetricType) -> Self {
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(t);
        Self { mf }
    }

    fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
        pairs
            .iter()
            .map(|(k, v)| {
                let mut l = LabelPair::default();
                l.set_name(k.to_string());
                l.set_value(v.to_string());
                l
            })
            .collect()
    }

    fn value(&mut self, labels: &[(&str, &str)], v: f64) {
        let mut m = Metric::from_label(Self::labels(labels));
        match self.mf.get_field_type() {
            MetricType::COUNTER => {
                let mut c = Counter::default();
                c.set_value(v);
                m.set_counter(c);
            }
            _ => {
                let mut g = Gauge::default();
                g.set_value(v);
                m.set_gauge(g);
            }
        }
        self.mf.mut_metric().push(m);
    }

    fn histogram(&mut self, labels: &[(&str, &str)], h: &Log2Hist, sum_seconds: f64) {
        let mut hist = Histogram::default();
        let buckets = h
            .cumulative_buckets()
            .into_iter()
            .map(|(le, n)| {
                let mut b = Bucket::default();
                b.set_upper_bound(le);
                b.set_cumulative_count(n);
                b
            })
            .collect();
        hist.set_bucket(buckets);
        hist.set_sample_count(h.total());
        hist.set_sample_sum(sum_seconds);
        let mut m = Metric::from_label(Self::labels(labels));
        m.set_histogram(hist);
        self.mf.mut_metric().push(m);
    }
}

/// Builds every stallmon metric family from the state.
pub fn families(state: &MetricsState) -> Vec<MetricFamily> {
    let job = state.job_name.as_str();
    let mut out = Vec::new();
    let mut push = |f: Family| {
        if !f.mf.get_metric().is_empty() {
            out.push(f.mf);
        }
    };

    if let Some(s) = &state.snapshot {
        let mut lat = Family::new(
            "stallmon_block_io_latency_seconds",
            "Block I/O latency from issue to completion, per device and operation.",
            MetricType::HISTOGRAM,
        );
        let mut queue = Family::new(
            "stallmon_block_io_queue_seconds",
            "Block I/O queue time from insertion into the scheduler to issue to the device.",
            MetricType::HISTOGRAM,
        );
        let mut bytes = Family::new(
            "stallmon_block_io_bytes_total",
            "Bytes completed by the block layer, per device and operation.",
            MetricType::COUNTER,
        );
        let mut reqs = Family::new(
            "stallmon_block_io_requests_total",
            "Block requests completed, per device and operation.",
            MetricType::COUNTER,
        );
        let mut job_bytes = Family::new(
            "stallmon_block_io_job_bytes_total",
            "Bytes of block requests submitted by the traced job, by role of the submitter.",
            MetricType::COUNTER,
        );
        for ((dev, op), b) in &s.block {
            let l = [
                ("job_name", job),
                ("device", dev.as_str()),
                ("op", op.as_str()),
            ];
            lat.histogram(&l, &b.latency, b.lat_sum_ns as f64 * 1e-9);
            queue.histogram(&l, &b.queue, b.queue_sum_ns as f64 * 1e-9);
            bytes.value(&l, b.bytes as f64);
            reqs.value(&l, b.count as f64);
            for (r, role) in ROLE_NAMES.iter().enumerate() {
                let l = [
                    ("job_name", job),
                    ("device", dev.as_str()),
                    ("op", op.as_str()),
                    ("role", role),
                ];
                job_bytes.value(&l, b.job_bytes[r] as f64);
            }
        }
        push(lat);
        push(queue);
        push(bytes);
        push(reqs);
        push(job_bytes);

        let mut rlat = Family::new(
            "stallmon_read_latency_seconds",
            "Latency of the job's read-family syscalls, by role and kind of file descriptor.",
            MetricType::HISTOGRAM,
        );
        let mut rbytes = Family::new(
            "stallmon_read_bytes_total",
            "Bytes returned by the job's read-family syscalls, by role and fd kind.",
            MetricType::COUNTER,
        );
        let mut states = Family::new(
            "stallmon_task_state_seconds_total",
            "Time the job's threads spent in each state, by role.",
            MetricType::COUNTER,
        );
        let mut tracked = Family::new(
            "stallmon_tracked_processes",
            "Live processes of the job being traced, by role.",
            MetricType::GAUGE,
        );
        for (role, rt) in ROLE_NAMES.iter().zip(&s.roles) {
            for (k, kind) in FD_KIND_NAMES.iter().enumerate() {
                let l = [("job_name", job), ("role", role), ("fd_kind", kind)];
                rlat.histogram(&l, &rt.read[k].hist, rt.read[k].sum_ns as f64 * 1e-9);
                rbytes.value(&l, rt.read[k].bytes as f64);
            }
            for (st, name) in STATE_NAMES.iter().enumerate() {
                let l = [("job_name", job), ("role", role), ("state", name)];
                states.value(&l, rt.state_ns[st] as f64 * 1e-9);
            }
            tracked.value(&[("job_name", job), ("role", role)], rt.processes as f64);
        }
        push(rlat);
        push(rbytes);
        push(states);
        push(tracked);

        let mut drops = Family::new(
            "stallmon_dropped_events_total",
            "Events the kernel programs could not record, by reason (a full map, a full ring buffer, a failed kernel read).",
            MetricType::COUNTER,
        );
        for (i, name) in DROP_NAMES.iter().enumerate() {
            drops.value(&[("job_name", job), ("reason", name)], s.drops[i] as f64);
        }
        push(drops);

        let mut up = Family::new(
            "stallmon_target_up",
            "1 while the traced process is alive.",
            MetricType::GAUGE,
        );
        up.value(&[("job_name", job)], if s.target_alive { 1.0 } else { 0.0 });
        push(up);
    }

    gpu_families(state, job, &mut out);
    out
}

fn gpu_families(state: &MetricsState, job: &str, out: &mut Vec<MetricFamily>) {
    let Some(source) = state.gpu_source else {
        return;
    };
    let mut sim = Family::new(
        "stallmon_gpu_simulated",
        "1 when the GPU figures come from a simulated GPU (demo), 0 for NVML.",
        MetricType::GAUGE,
    );
    sim.value(
        &[("job_name", job)],
        if source == "simulated" { 1.0 } else { 0.0 },
    );
    let mut util = Family::new(
        "stallmon_gpu_utilization_ratio",
        "Fraction of the last sample period during which a kernel ran on the GPU.",
        MetricType::GAUGE,
    );
    let mut busy = Family::new(
        "stallmon_gpu_busy_seconds_total",
        "GPU time with a kernel running.",
        MetricType::COUNTER,
    );
    let mut idle = Family::new(
        "stallmon_gpu_idle_seconds_total",
        "GPU idle time attributed to its cause: io (storage), preprocess (CPU data preparation), host (feeder-side work), other.",
        MetricType::COUNTER,
    );
    let mut mem_used = Family::new(
        "stallmon_gpu_memory_used_bytes",
        "GPU memory in use.",
        MetricType::GAUGE,
    );
    let mut mem_total = Family::new(
        "stallmon_gpu_memory_total_bytes",
        "GPU memory in total.",
        MetricType::GAUGE,
    );
    let mut temp = Family::new(
        "stallmon_gpu_temperature_celsius",
        "GPU temperature.",
        MetricType::GAUGE,
    );
    let mut power = Family::new(
        "stallmon_gpu_power_watts",
        "GPU power draw.",
        MetricType::GAUGE,
    );
    let mut pcie = Family::new(
        "stallmon_gpu_pcie_bytes_total",
        "Bytes over PCIe, estimated from NVML throughput samples, by direction.",
        MetricType::COUNTER,
    );
    let mut throttle = Family::new(
        "stallmon_gpu_throttle_reasons",
        "1 when a clock-throttle reason is active on the GPU.",
        MetricType::GAUGE,
    );
    let mut stale = Family::new(
        "stallmon_gpu_stale",
        "1 when the GPU stopped answering NVML (its figures are stale).",
        MetricType::GAUGE,
    );
    for g in &state.gpus {
        let idx = g.index.to_string();
        let gl = [("job_name", job), ("gpu", idx.as_str())];
        if let Some(u) = g.utilization {
            util.value(
                &[
                    ("job_name", job),
                    ("gpu", idx.as_str()),
                    ("uuid", g.uuid.as_str()),
                    ("model", g.model.as_str()),
                ],
                u,
            );
        }
        busy.value(&gl, g.busy_s);
        for (c, cause) in CAUSES.iter().enumerate() {
            idle.value(
                &[("job_name", job), ("gpu", idx.as_str()), ("cause", cause)],
                g.idle_s[c],
            );
        }
        if let Some(v) = g.memory_used_bytes {
            mem_used.value(&gl, v as f64);
        }
        if let Some(v) = g.memory_total_bytes {
            mem_total.value(&gl, v as f64);
        }
        if let Some(v) = g.temperature_c {
            temp.value(&gl, v);
        }
        if let Some(v) = g.power_w {
            power.value(&gl, v);
        }
        for (dir, v) in [("rx", g.pcie_rx_bytes), ("tx", g.pcie_tx_bytes)] {
            if let Some(v) = v {
                pcie.value(
                    &[("job_name", job), ("gpu", idx.as_str()), ("direction", dir)],
                    v as f64,
                );
            }
        }
        for (reason, on) in &g.throttle_reasons {
            throttle.value(
                &[("job_name", job), ("gpu", idx.as_str()), ("reason", reason)],
                if *on { 1.0 } else { 0.0 },
            );
        }
        stale.value(&gl, if g.stale { 1.0 } else { 0.0 });
    }
    for f in [
        sim, util, busy, idle, mem_used, mem_total, temp, power, pcie, throttle, stale,
    ] {
        if !f.mf.get_metric().is_empty() {
            out.push(f.mf);
        }
    }
}

/// The `prometheus` collector over the shared state.
struct StallmonCollector {
    state: SharedState,
    descs: Vec<Desc>,
}

impl Collector for StallmonCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        match self.state.read() {
            Ok(s) => families(&s),
            Err(_) => Vec::new(),
        }
    }
}

/// A registry with stallmon's metrics and its own process metrics (CPU, RSS, fds).
pub fn registry(state: SharedState) -> prometheus::Result<Registry> {
    let registry = Registry::new();
    registry.register(Box::new(StallmonCollector {
        state,
        descs: Vec::new(),
    }))?;
    let process = prometheus::process_collector::ProcessCollector::for_self();
    registry.register(Box::new(process))?;
    Ok(registry)
}

/// Text exposition of everything in `registry`.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    let encoder = TextEncoder::new();
    if encoder.encode(&registry.gather(), &mut buf).is_err() {
        return String::new();
    }
    String::from_utf8(buf).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::{BlockTotals, Snapshot};

    #[test]
    fn exposition_has_every_family_and_cumulative_buckets() {
        let mut snap = Snapshot::default();
        let mut b = BlockTotals::default();
        b.latency.add_slot(7, 10);
        b.latency.add_slot(9, 5);
        b.count = 15;
        b.lat_sum_ns = 15 * 100_000;
        snap.block.insert(("vda".into(), "read".into()), b);
        snap.target_alive = true;
        let state: SharedState = Arc::new(RwLock::new(MetricsState {
            job_name: "test".into(),
            snapshot: Some(snap),
            gpus: vec![GpuMetrics::default()],
            gpu_source: Some("simulated"),
        }));
        let text = render(&registry(state).unwrap());
        for name in [
            "stallmon_block_io_latency_seconds_bucket",
            "stallmon_block_io_queue_seconds_count",
            "stallmon_block_io_bytes_total",
            "stallmon_read_latency_seconds_bucket",
            "stallmon_read_bytes_total",
            "stallmon_task_state_seconds_total",
            "stallmon_tracked_processes",
            "stallmon_dropped_events_total",
            "stallmon_gpu_idle_seconds_total",
            "stallmon_gpu_simulated",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
        assert!(text.contains(
            "stallmon_block_io_latency_seconds_bucket{job_name=\"test\",device=\"vda\",op=\"read\",le=\"0.000128\"} 10"
        ), "{text}");
        assert!(text.contains(
            "stallmon_block_io_latency_seconds_bucket{job_name=\"test\",device=\"vda\",op=\"read\",le=\"+Inf\"} 15"
        ));
    }
}
