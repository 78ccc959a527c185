//! Prometheus exposition. The kernel already aggregates (log2 histograms, counters) and the
//! ledger folds them, so instead of re-observing values into client-side metrics we implement a
//! `prometheus::core::Collector` that turns the latest [`View`] into metric families at scrape
//! time, the way ebpf_exporter decodes its maps.
//!
//! Labels are bounded: jobs (by their identity labels), ranks, roles, GPUs, devices; never PIDs.
//! GPU labels follow dcgm-exporter (`gpu`, `UUID`, `modelName`, `pci_bus_id`, `device`,
//! `Hostname`, `pod`, `namespace`, `container`) so that `* on(UUID) group_left` joins work.
use std::sync::{Arc, RwLock};

use monitor_common::{DROP_NAMES, FD_KIND_NAMES, STATE_NAMES};
use prometheus::{
    Encoder, Registry, TextEncoder,
    core::{Collector, Desc},
    proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::{
    attribution::CAUSE_NAMES,
    collector::HistTotals,
    gpu::GpuInfo,
    hist::Log2Hist,
    ledger::{BlockAcc, RoleAcc},
    schema::JobLabels,
};

/// One job as exported.
#[derive(Clone, Debug, Default)]
pub struct JobView {
    pub labels: JobLabels,
    /// Some process of the job is alive.
    pub up: bool,
    /// By (rank, role): cumulative totals (feeder and worker).
    pub roles: Vec<(String, String, RoleAcc)>,
    /// By (rank, role): live processes (launchers with rank "").
    pub processes: Vec<(String, String, u64)>,
}

/// One GPU's gauges and who holds it.
#[derive(Clone, Debug, Default)]
pub struct GpuView {
    pub info: GpuInfo,
    pub owner: Option<(JobLabels, String)>,
    pub utilization: Option<f64>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub temperature_c: Option<f64>,
    pub power_w: Option<f64>,
    pub pcie_rx_bytes: Option<u64>,
    pub pcie_tx_bytes: Option<u64>,
    pub throttle_reasons: Vec<(&'static str, bool)>,
    pub stale: bool,
}

/// GPU time attributed while a GPU belonged to a job's rank.
#[derive(Clone, Debug, Default)]
pub struct AttributedView {
    pub labels: JobLabels,
    pub rank: String,
    pub gpu: u32,
    pub uuid: String,
    pub busy_s: f64,
    /// Idle seconds by cause: io, preprocess, host, other.
    pub idle_s: [f64; 4],
}

/// What `/metrics` shows, rebuilt every interval.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub block: Vec<((String, String), BlockAcc)>,
    pub drops: Vec<u64>,
    pub record_errors: u64,
    pub jobs: Vec<JobView>,
    pub gpus: Vec<GpuView>,
    pub attributed: Vec<AttributedView>,
    /// "nvml", "simulated", or None when GPU attribution is disabled.
    pub gpu_source: Option<&'static str>,
    pub slots_used: u64,
    pub slots_total: u64,
    /// Entries of the kernel's process table.
    pub kernel_processes: u64,
    /// Whether the block issue probe is attached.
    pub issue_probe: bool,
    pub hostname: String,
}

pub type SharedView = Arc<RwLock<View>>;

/// The version and revision stallmon was built from.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const REVISION: &str = env!("STALLMON_REVISION");

struct Family {
    mf: MetricFamily,
}

fn pairs(labels: &[(&str, &str)]) -> Vec<LabelPair> {
    labels
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name(k.to_string());
            l.set_value(v.to_string());
            l
        })
        .collect()
}

impl Family {
    fn new(name: &str, help: &str, t: MetricType) -> Self {
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(t);
        Self { mf }
    }

    fn value(&mut self, labels: &[(&str, &str)], v: f64) {
        let mut m = Metric::from_label(pairs(labels));
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

    fn histogram(&mut self, labels: &[(&str, &str)], h: &HistTotals) {
        let l = Log2Hist::from_counts(h.hist);
        let mut hist = Histogram::default();
        let buckets = l
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
        hist.set_sample_count(l.total());
        hist.set_sample_sum(h.sum_ns as f64 * 1e-9);
        let mut m = Metric::from_label(pairs(labels));
        m.set_histogram(hist);
        self.mf.mut_metric().push(m);
    }
}

/// The job identity labels, in a fixed order.
fn job_labels(l: &JobLabels) -> [(&'static str, &str); 5] {
    [
        ("job_name", l.job_name.as_str()),
        ("pod", l.pod.as_str()),
        ("namespace", l.namespace.as_str()),
        ("container", l.container.as_str()),
        ("hpc_job", l.hpc_job.as_str()),
    ]
}

fn with<'a>(base: &[(&'a str, &'a str)], extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    base.iter().chain(extra).copied().collect()
}

/// Builds every stallmon metric family from the view.
pub fn families(v: &View) -> Vec<MetricFamily> {
    let mut out = Vec::new();
    let mut push = |f: Family| {
        if !f.mf.get_metric().is_empty() {
            out.push(f.mf);
        }
    };

    let mut info = Family::new(
        "stallmon_build_info",
        "stallmon's version and the source revision it was built from (always 1).",
        MetricType::GAUGE,
    );
    info.value(&[("version", VERSION), ("revision", REVISION)], 1.0);
    push(info);

    // Storage: the whole machine.
    let mut lat = Family::new(
        "stallmon_block_io_latency_seconds",
        "Block I/O latency from issue to completion, per device and operation (whole machine).",
        MetricType::HISTOGRAM,
    );
    let mut queue = Family::new(
        "stallmon_block_io_queue_seconds",
        "Block I/O time from the request's allocation (block layer start time) to issue to the device.",
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
        "Bytes of block requests submitted by traced jobs' feeders and workers (all jobs), by role of the submitter.",
        MetricType::COUNTER,
    );
    for ((dev, op), b) in &v.block {
        let l = [("device", dev.as_str()), ("op", op.as_str())];
        lat.histogram(&l, &b.latency);
        queue.histogram(&l, &b.queue);
        bytes.value(&l, b.bytes as f64);
        reqs.value(&l, b.requests as f64);
        for (r, role) in ["feeder", "worker"].iter().enumerate() {
            job_bytes.value(&with(&l, &[("role", role)]), b.job_bytes[r] as f64);
        }
    }
    push(lat);
    push(queue);
    push(bytes);
    push(reqs);
    push(job_bytes);

    // Jobs.
    let mut up = Family::new(
        "stallmon_target_up",
        "1 while some process of the job is alive.",
        MetricType::GAUGE,
    );
    let mut tracked = Family::new(
        "stallmon_tracked_processes",
        "Live processes of the job, by rank and role (launchers have an empty rank).",
        MetricType::GAUGE,
    );
    let mut states = Family::new(
        "stallmon_task_state_seconds_total",
        "Time the job's feeder and worker threads spent in each state, by rank and role.",
        MetricType::COUNTER,
    );
    let mut stall = Family::new(
        "stallmon_read_stall_seconds",
        "Sleeps inside read-family calls (each sleep one observation; a call may sleep several times or not at all), by rank, role and fd kind.",
        MetricType::HISTOGRAM,
    );
    let mut rlat = Family::new(
        "stallmon_read_latency_seconds",
        "Latency of every read-family call, by rank, role and fd kind (--syscalls only).",
        MetricType::HISTOGRAM,
    );
    let mut rbytes = Family::new(
        "stallmon_read_bytes_total",
        "Bytes returned by read-family calls, by rank, role and fd kind (--syscalls only).",
        MetricType::COUNTER,
    );
    let mut syscr = Family::new(
        "stallmon_task_read_syscalls_total",
        "Read-family calls of the job's processes, from the kernel's per-task I/O accounting, by rank and role.",
        MetricType::COUNTER,
    );
    let mut rchar = Family::new(
        "stallmon_task_read_bytes_total",
        "Bytes returned by the job's read-family calls (any file descriptor), from per-task I/O accounting.",
        MetricType::COUNTER,
    );
    let mut rstorage = Family::new(
        "stallmon_task_storage_read_bytes_total",
        "Bytes the job's processes caused to be fetched from storage, from per-task I/O accounting.",
        MetricType::COUNTER,
    );
    let mut jreqs = Family::new(
        "stallmon_job_block_io_requests_total",
        "Block requests submitted by the job's processes, by rank and role.",
        MetricType::COUNTER,
    );
    let mut jbytes = Family::new(
        "stallmon_job_block_io_bytes_total",
        "Bytes of block requests submitted by the job's processes, by rank and role.",
        MetricType::COUNTER,
    );
    for j in &v.jobs {
        let jl = job_labels(&j.labels);
        up.value(&jl, if j.up { 1.0 } else { 0.0 });
        for (rank, role, n) in &j.processes {
            tracked.value(&with(&jl, &[("rank", rank), ("role", role)]), *n as f64);
        }
        for (rank, role, acc) in &j.roles {
            let rl = with(&jl, &[("rank", rank), ("role", role)]);
            for (s, name) in STATE_NAMES.iter().enumerate() {
                states.value(
                    &with(&rl, &[("state", name)]),
                    acc.state_ns[s] as f64 * 1e-9,
                );
            }
            for (k, kind) in FD_KIND_NAMES.iter().enumerate() {
                let kl = with(&rl, &[("fd_kind", kind)]);
                stall.histogram(&kl, &acc.stalls[k]);
                if let Some(r) = &acc.reads {
                    rlat.histogram(&kl, &r[k].latency);
                    rbytes.value(&kl, r[k].bytes as f64);
                }
            }
            syscr.value(&rl, acc.task_io.syscr as f64);
            rchar.value(&rl, acc.task_io.rchar as f64);
            rstorage.value(&rl, acc.task_io.read_bytes as f64);
            jreqs.value(&rl, acc.blk_requests as f64);
            jbytes.value(&rl, acc.blk_bytes as f64);
        }
    }
    for f in [
        up, tracked, states, stall, rlat, rbytes, syscr, rchar, rstorage, jreqs, jbytes,
    ] {
        push(f);
    }

    let mut drops = Family::new(
        "stallmon_dropped_events_total",
        "Events the kernel programs could not record, by reason (a full map, a slot collision, a full ring buffer, a failed kernel read).",
        MetricType::COUNTER,
    );
    for (i, name) in DROP_NAMES.iter().enumerate() {
        drops.value(
            &[("reason", name)],
            v.drops.get(i).copied().unwrap_or(0) as f64,
        );
    }
    push(drops);
    let mut rec = Family::new(
        "stallmon_record_errors_total",
        "Record-file lines that could not be written (tracing goes on).",
        MetricType::COUNTER,
    );
    rec.value(&[], v.record_errors as f64);
    push(rec);
    let mut slots = Family::new(
        "stallmon_rank_slots",
        "Rank slots of the kernel tables, used and free (--max-ranks).",
        MetricType::GAUGE,
    );
    slots.value(&[("state", "used")], v.slots_used as f64);
    slots.value(
        &[("state", "free")],
        v.slots_total.saturating_sub(v.slots_used) as f64,
    );
    push(slots);
    let mut kprocs = Family::new(
        "stallmon_kernel_processes",
        "Processes in the kernel's table of tracked processes (all jobs; exited ones until read).",
        MetricType::GAUGE,
    );
    kprocs.value(&[], v.kernel_processes as f64);
    push(kprocs);
    let mut issue = Family::new(
        "stallmon_block_issue_probe_attached",
        "1 while the block_rq_issue probe is attached: some device's requests are not timed by the block layer itself (or --block-issue-time probe).",
        MetricType::GAUGE,
    );
    issue.value(&[], if v.issue_probe { 1.0 } else { 0.0 });
    push(issue);
    let mut njobs = Family::new(
        "stallmon_jobs",
        "Jobs followed (ended jobs stay until --forget-after).",
        MetricType::GAUGE,
    );
    njobs.value(&[], v.jobs.len() as f64);
    push(njobs);

    gpu_families(v, &mut out);
    out
}

fn gpu_families(v: &View, out: &mut Vec<MetricFamily>) {
    let Some(source) = v.gpu_source else {
        return;
    };
    let mut sim = Family::new(
        "stallmon_gpu_simulated",
        "1 when the GPU figures come from the stand-in NVML library (tests, demo), 0 for the NVIDIA driver.",
        MetricType::GAUGE,
    );
    sim.value(&[], if source == "simulated" { 1.0 } else { 0.0 });
    let mut info = Family::new(
        "stallmon_gpu_info",
        "GPU identity with dcgm-exporter's label names (always 1): join on UUID.",
        MetricType::GAUGE,
    );
    let mut util = Family::new(
        "stallmon_gpu_utilization_ratio",
        "Fraction of the last sample period during which a kernel ran on the GPU.",
        MetricType::GAUGE,
    );
    let mut busy = Family::new(
        "stallmon_gpu_busy_seconds_total",
        "GPU time with a kernel running, while the GPU belonged to the job's rank.",
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
    let empty = JobLabels::default();
    for g in &v.gpus {
        let idx = g.info.index.to_string();
        let device = g.info.device();
        info.value(
            &[
                ("gpu", idx.as_str()),
                ("UUID", g.info.uuid.as_str()),
                ("modelName", g.info.model.as_str()),
                ("pci_bus_id", g.info.pci_bus_id.as_str()),
                ("device", device.as_str()),
                ("Hostname", v.hostname.as_str()),
            ],
            1.0,
        );
        let (labels, rank) = g
            .owner
            .as_ref()
            .map(|(l, r)| (l, r.as_str()))
            .unwrap_or((&empty, ""));
        let gl = with(
            &[("gpu", idx.as_str()), ("UUID", g.info.uuid.as_str())],
            &with(&job_labels(labels), &[("rank", rank)]),
        );
        if let Some(u) = g.utilization {
            util.value(&gl, u);
        }
        if let Some(x) = g.memory_used_bytes {
            mem_used.value(&gl, x as f64);
        }
        if let Some(x) = g.memory_total_bytes {
            mem_total.value(&gl, x as f64);
        }
        if let Some(x) = g.temperature_c {
            temp.value(&gl, x);
        }
        if let Some(x) = g.power_w {
            power.value(&gl, x);
        }
        for (dir, x) in [("rx", g.pcie_rx_bytes), ("tx", g.pcie_tx_bytes)] {
            if let Some(x) = x {
                pcie.value(&with(&gl, &[("direction", dir)]), x as f64);
            }
        }
        for (reason, on) in &g.throttle_reasons {
            throttle.value(
                &with(&gl, &[("reason", reason)]),
                if *on { 1.0 } else { 0.0 },
            );
        }
        stale.value(&gl, if g.stale { 1.0 } else { 0.0 });
    }
    for a in &v.attributed {
        let idx = a.gpu.to_string();
        let gl = with(
            &[("gpu", idx.as_str()), ("UUID", a.uuid.as_str())],
            &with(&job_labels(&a.labels), &[("rank", a.rank.as_str())]),
        );
        busy.value(&gl, a.busy_s);
        for (c, cause) in CAUSE_NAMES.iter().enumerate() {
            idle.value(&with(&gl, &[("cause", cause)]), a.idle_s[c]);
        }
    }
    for f in [
        sim, info, util, busy, idle, mem_used, mem_total, temp, power, pcie, throttle, stale,
    ] {
        if !f.mf.get_metric().is_empty() {
            out.push(f.mf);
        }
    }
}

/// The `prometheus` collector over the shared view.
struct StallmonCollector {
    view: SharedView,
    descs: Vec<Desc>,
}

impl Collector for StallmonCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        match self.view.read() {
            Ok(v) => families(&v),
            Err(_) => Vec::new(),
        }
    }
}

/// A registry with stallmon's metrics and its own process metrics (CPU, RSS, fds).
pub fn registry(view: SharedView) -> prometheus::Result<Registry> {
    let registry = Registry::new();
    registry.register(Box::new(StallmonCollector {
        view,
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

    #[test]
    fn exposition_has_every_family_and_cumulative_buckets() {
        let mut b = BlockAcc::default();
        b.latency.hist[7] = 10;
        b.latency.hist[9] = 5;
        b.latency.count = 15;
        b.latency.sum_ns = 15 * 100_000;
        b.requests = 15;
        let labels = JobLabels {
            job_name: "test".into(),
            hpc_job: "42".into(),
            ..JobLabels::default()
        };
        let mut role = RoleAcc::default();
        role.stalls[0].hist[10] = 3;
        let view = View {
            block: vec![(("vda".into(), "read".into()), b)],
            jobs: vec![JobView {
                labels: labels.clone(),
                up: true,
                roles: vec![("0".into(), "worker".into(), role)],
                processes: vec![
                    ("0".into(), "worker".into(), 4),
                    ("".into(), "launcher".into(), 1),
                ],
            }],
            gpus: vec![GpuView {
                info: GpuInfo {
                    index: 0,
                    uuid: "GPU-abc".into(),
                    model: "H100".into(),
                    pci_bus_id: "00000000:3B:00.0".into(),
                    minor: Some(0),
                },
                owner: Some((labels.clone(), "0".into())),
                utilization: Some(0.5),
                ..GpuView::default()
            }],
            attributed: vec![AttributedView {
                labels,
                rank: "0".into(),
                gpu: 0,
                uuid: "GPU-abc".into(),
                busy_s: 1.0,
                idle_s: [2.0, 0.0, 0.0, 0.0],
            }],
            gpu_source: Some("simulated"),
            hostname: "node1".into(),
            ..View::default()
        };
        let text = render(&registry(Arc::new(RwLock::new(view))).unwrap());
        for name in [
            "stallmon_build_info{",
            "stallmon_block_io_latency_seconds_bucket",
            "stallmon_block_io_queue_seconds_count",
            "stallmon_read_stall_seconds_bucket",
            "stallmon_task_state_seconds_total",
            "stallmon_tracked_processes",
            "stallmon_dropped_events_total",
            "stallmon_gpu_idle_seconds_total",
            "stallmon_gpu_simulated",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
        assert!(text.contains(
            "stallmon_block_io_latency_seconds_bucket{device=\"vda\",op=\"read\",le=\"0.000128\"} 10"
        ), "{text}");
        assert!(text.contains(
            "stallmon_gpu_info{gpu=\"0\",UUID=\"GPU-abc\",modelName=\"H100\",pci_bus_id=\"00000000:3B:00.0\",device=\"nvidia0\",Hostname=\"node1\"} 1"
        ), "{text}");
        assert!(text.contains("stallmon_gpu_idle_seconds_total{gpu=\"0\",UUID=\"GPU-abc\",job_name=\"test\",pod=\"\",namespace=\"\",container=\"\",hpc_job=\"42\",rank=\"0\",cause=\"io\"} 2"), "{text}");
        assert!(text.contains("stallmon_tracked_processes{job_name=\"test\",pod=\"\",namespace=\"\",container=\"\",hpc_job=\"42\",rank=\"\",role=\"launcher\"} 1"), "{text}");
        assert!(
            !text.contains("stallmon_read_latency_seconds"),
            "no --syscalls"
        );
    }
}
