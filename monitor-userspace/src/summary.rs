//! The exit summary, in the spirit of `perf stat`: a human table on stderr, or a JSON document on
//! stdout with `--json`. Both come from the same [`Summary`].
use std::fmt::Write as _;

use monitor_common::{FD_KIND_NAMES, NUM_FD_KINDS, NUM_ROLES, NUM_STATES, ROLE_NAMES, STATE_NAMES};
use serde::{Deserialize, Serialize};

use crate::{
    collector::Snapshot,
    hist::{Log2Hist, fmt_bytes, fmt_seconds},
};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_seconds: Option<f64>,
    pub p50_seconds: Option<f64>,
    pub p90_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
    /// Raw log2 slot counts (slot i: below 2^i microseconds).
    pub histogram: Vec<u64>,
}

impl LatencySummary {
    fn new(h: &Log2Hist, sum_ns: u64, n: u64) -> Self {
        Self {
            count: h.total(),
            mean_seconds: (n > 0).then(|| sum_ns as f64 * 1e-9 / n as f64),
            p50_seconds: h.quantile(0.5),
            p90_seconds: h.quantile(0.9),
            p99_seconds: h.quantile(0.99),
            histogram: h.counts.to_vec(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlockSummary {
    pub device: String,
    pub op: String,
    pub requests: u64,
    pub bytes: u64,
    pub errors: u64,
    pub latency: LatencySummary,
    pub queue: LatencySummary,
    /// Requests and bytes submitted by the job, by role.
    pub job_requests: [u64; NUM_ROLES],
    pub job_bytes: [u64; NUM_ROLES],
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReadSummary {
    pub role: String,
    pub fd_kind: String,
    pub count: u64,
    pub bytes: u64,
    pub errors: u64,
    pub latency: LatencySummary,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoleSummary {
    pub role: String,
    /// Seconds in each state: on_cpu, storage_wait, ipc_wait, other_wait.
    pub state_seconds: std::collections::BTreeMap<String, f64>,
    pub live_processes: u64,
    pub processes_seen: u64,
    pub processes_exited: u64,
    pub block_requests: u64,
    pub block_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProcessSummary {
    pub pid: u32,
    pub role: String,
    pub parent: u32,
    pub comm: String,
    pub exited: bool,
    pub execs: u32,
    pub state_seconds: [f64; NUM_STATES],
    pub read_bytes: [u64; NUM_FD_KINDS],
    pub read_count: [u64; NUM_FD_KINDS],
    pub block_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub duration_seconds: f64,
    pub target_pid: u32,
    pub job_name: String,
    pub target_exit_status: Option<i32>,
    pub block: Vec<BlockSummary>,
    pub reads: Vec<ReadSummary>,
    pub roles: Vec<RoleSummary>,
    pub processes: Vec<ProcessSummary>,
    pub dropped_events: std::collections::BTreeMap<String, u64>,
    /// GPU attribution results and verdicts (empty when GPU attribution is disabled).
    pub gpu: Vec<serde_json::Value>,
    pub gpu_verdicts: Vec<String>,
    /// Why GPU attribution is disabled, if it is.
    pub gpu_disabled: Option<String>,
    /// Directory the job's open files were most often in (sampled from /proc/PID/fd).
    #[serde(default)]
    pub hottest_path: Option<String>,
}

impl Summary {
    pub fn from_snapshot(
        snap: &Snapshot,
        duration_seconds: f64,
        target_pid: u32,
        job_name: &str,
    ) -> Self {
        let block = snap
            .block
            .iter()
            .map(|((dev, op), b)| BlockSummary {
                device: dev.clone(),
                op: op.clone(),
                requests: b.count,
                bytes: b.bytes,
                errors: b.errors,
                latency: LatencySummary::new(&b.latency, b.lat_sum_ns, b.lat_count),
                queue: LatencySummary::new(&b.queue, b.queue_sum_ns, b.queue_count),
                job_requests: b.job_count,
                job_bytes: b.job_bytes,
            })
            .collect();
        let mut reads = Vec::new();
        let mut roles = Vec::new();
        for (r, rt) in snap.roles.iter().enumerate() {
            for (k, rd) in rt.read.iter().enumerate() {
                reads.push(ReadSummary {
                    role: ROLE_NAMES[r].to_string(),
                    fd_kind: FD_KIND_NAMES[k].to_string(),
                    count: rd.count,
                    bytes: rd.bytes,
                    errors: rd.errors,
                    latency: LatencySummary::new(&rd.hist, rd.sum_ns, rd.count),
                });
            }
            let seen = snap.procs.values().filter(|p| p.role as usize == r);
            let (mut n, mut exited) = (0, 0);
            for p in seen {
                n += 1;
                exited += p.exited as u64;
            }
            roles.push(RoleSummary {
                role: ROLE_NAMES[r].to_string(),
                state_seconds: STATE_NAMES
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (s.to_string(), rt.state_ns[i] as f64 * 1e-9))
                    .collect(),
                live_processes: rt.processes,
                processes_seen: n,
                processes_exited: exited,
                block_requests: rt.blk_count,
                block_bytes: rt.blk_bytes,
            });
        }
        let processes = snap
            .procs
            .values()
            .map(|p| ProcessSummary {
                pid: p.pid,
                role: ROLE_NAMES
                    .get(p.role as usize)
                    .copied()
                    .unwrap_or("worker")
                    .to_string(),
                parent: p.parent,
                comm: p.comm.clone(),
                exited: p.exited,
                execs: p.execs,
                state_seconds: p.state_ns.map(|v| v as f64 * 1e-9),
                read_bytes: p.read_bytes,
                read_count: p.read_count,
                block_bytes: p.blk_bytes,
            })
            .collect();
        let dropped_events = monitor_common::DROP_NAMES
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), snap.drops[i]))
            .collect();
        Self {
            duration_seconds,
            target_pid,
            job_name: job_name.to_string(),
            target_exit_status: None,
            block,
            reads,
            roles,
            processes,
            dropped_events,
            gpu: Vec::new(),
            gpu_verdicts: Vec::new(),
            gpu_disabled: None,
            hottest_path: None,
        }
    }

    /// The human table.
    pub fn human(&self) -> String {
        let mut o = String::new();
        let comm = self
            .processes
            .iter()
            .find(|p| p.pid == self.target_pid)
            .map(|p| p.comm.as_str())
            .unwrap_or("?");
        let _ = writeln!(
            o,
            "\n stallmon summary: {:.1} s traced, target PID {} ({comm}), job \"{}\"\n",
            self.duration_seconds, self.target_pid, self.job_name
        );
        let _ = writeln!(
            o,
            " {:<22} {:>9} {:>11} {:>9} {:>9} {:>9} {:>10}",
            "block I/O (device op)", "requests", "bytes", "p50", "p90", "p99", "queue p99"
        );
        let opt = |v: Option<f64>| v.map(fmt_seconds).unwrap_or_else(|| "-".into());
        for b in self.block.iter().filter(|b| b.requests > 0) {
            let _ = writeln!(
                o,
                " {:<22} {:>9} {:>11} {:>9} {:>9} {:>9} {:>10}",
                format!("{} {}", b.device, b.op),
                b.requests,
                fmt_bytes(b.bytes),
                opt(b.latency.p50_seconds),
                opt(b.latency.p90_seconds),
                opt(b.latency.p99_seconds),
                opt(b.queue.p99_seconds),
            );
        }
        let _ = writeln!(
            o,
            "\n {:<22} {:>9} {:>11} {:>9} {:>9} {:>9}",
            "read syscalls (role fd)", "count", "bytes", "mean", "p50", "p99"
        );
        for r in self.reads.iter().filter(|r| r.count > 0) {
            let _ = writeln!(
                o,
                " {:<22} {:>9} {:>11} {:>9} {:>9} {:>9}",
                format!("{} {}", r.role, r.fd_kind),
                r.count,
                fmt_bytes(r.bytes),
                opt(r.latency.mean_seconds),
                opt(r.latency.p50_seconds),
                opt(r.latency.p99_seconds),
            );
        }
        let _ = writeln!(
            o,
            "\n {:<22} {:>9} {:>13} {:>9} {:>11}   processes",
            "thread time (role)", "on_cpu", "storage_wait", "ipc_wait", "other_wait"
        );
        for r in &self.roles {
            let total: f64 = r.state_seconds.values().sum();
            let pct = |s: &str| {
                let v = r.state_seconds.get(s).copied().unwrap_or(0.0);
                if total > 0.0 {
                    format!("{:.1}%", 100.0 * v / total)
                } else {
                    "-".into()
                }
            };
            let _ = writeln!(
                o,
                " {:<22} {:>9} {:>13} {:>9} {:>11}   {} seen, {} exited",
                r.role,
                pct("on_cpu"),
                pct("storage_wait"),
                pct("ipc_wait"),
                pct("other_wait"),
                r.processes_seen,
                r.processes_exited
            );
        }
        let drops: u64 = self.dropped_events.values().sum();
        if drops == 0 {
            let _ = writeln!(o, "\n dropped events: none");
        } else {
            let list: Vec<String> = self
                .dropped_events
                .iter()
                .filter(|(_, v)| **v > 0)
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(o, "\n dropped events: {}", list.join(", "));
        }
        if let Some(why) = &self.gpu_disabled {
            let _ = writeln!(o, " {why}");
        }
        for v in &self.gpu_verdicts {
            let _ = writeln!(o, " {v}");
        }
        o
    }
}
