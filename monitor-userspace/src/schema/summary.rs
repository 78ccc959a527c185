//! The exit summary: `--json` on stdout, the record's last line, and what `stallmon report`
//! prints. One document for both modes: machine-wide figures, then one entry per job.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{JobLabels, record::FeederInfo};

/// Version of this document.
pub const VERSION: u32 = 2;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub version: u32,
    /// `trace` or `node`.
    pub mode: String,
    pub duration_seconds: f64,
    /// Whether the syscall programs were attached (`--syscalls`).
    pub syscalls: bool,
    /// Block I/O of the whole machine, per device and operation.
    pub block: Vec<BlockSummary>,
    pub dropped_events: BTreeMap<String, u64>,
    /// Record lines that could not be written.
    #[serde(default)]
    pub record_errors: u64,
    /// `nvml` or `simulated`; absent when GPU attribution is disabled.
    #[serde(default)]
    pub gpu_source: Option<String>,
    /// Why GPU attribution is disabled, if it is.
    #[serde(default)]
    pub gpu_disabled: Option<String>,
    pub jobs: Vec<JobSummary>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_seconds: Option<f64>,
    pub p50_seconds: Option<f64>,
    pub p90_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
    /// Raw log2 slot counts (slot i: below 2^i microseconds).
    pub histogram: Vec<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockSummary {
    pub device: String,
    pub op: String,
    pub requests: u64,
    pub bytes: u64,
    pub errors: u64,
    pub latency: LatencySummary,
    pub queue: LatencySummary,
    /// Requests and bytes submitted by tracked jobs, by role (feeder, worker).
    pub job_requests: [u64; 2],
    pub job_bytes: [u64; 2],
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobSummary {
    /// Run-local job number.
    pub job: u32,
    pub labels: JobLabels,
    /// The process the job was found by (`trace`: the target).
    pub root_pid: u32,
    /// Exit status of a command started by `stallmon trace -- CMD`.
    pub exit_status: Option<i32>,
    /// Every rank with its feeders over time.
    pub ranks: Vec<RankSummary>,
    /// The job's roles (feeder and worker time added over its ranks; launcher counts only).
    pub roles: Vec<RoleSummary>,
    /// Read stalls (each sleep inside a read-family call) by role and fd kind.
    pub stalls: Vec<StallSummary>,
    /// `--syscalls` only: every read-family call, by role and fd kind.
    pub reads: Vec<ReadSummary>,
    /// The kernel's per-task I/O accounting, by role.
    pub task_io: Vec<TaskIoSummary>,
    /// Processes seen (the most recent ones when there were very many).
    pub processes: Vec<ProcessSummary>,
    /// Processes left out of `processes` (bounded).
    #[serde(default)]
    pub processes_omitted: u64,
    /// Attributed time per GPU and rank.
    pub gpu: Vec<GpuSummary>,
    /// One line per GPU: where its idle time went and what to do.
    pub gpu_verdicts: Vec<String>,
    /// Directory the job's open files were most often in (sampled from /proc/PID/fd).
    pub hottest_path: Option<String>,
    /// The block device most of the job's files live on.
    #[serde(default)]
    pub data_device: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RankSummary {
    pub rank: String,
    pub local_rank: Option<u32>,
    pub feeders: Vec<FeederInfo>,
    pub roles: Vec<RoleSummary>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoleSummary {
    pub role: String,
    /// Seconds in each state: on_cpu, storage_wait, ipc_wait, other_wait, cpu_wait.
    pub state_seconds: BTreeMap<String, f64>,
    pub live_processes: u64,
    pub processes_seen: u64,
    pub processes_exited: u64,
    pub block_requests: u64,
    pub block_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StallSummary {
    pub role: String,
    pub fd_kind: String,
    pub latency: LatencySummary,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadSummary {
    pub role: String,
    pub fd_kind: String,
    pub count: u64,
    pub bytes: u64,
    pub errors: u64,
    pub latency: LatencySummary,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskIoSummary {
    pub role: String,
    pub read_syscalls: u64,
    pub read_bytes: u64,
    pub storage_read_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessSummary {
    pub pid: u32,
    pub rank: String,
    pub role: String,
    pub parent: u32,
    pub comm: String,
    pub exited: bool,
    pub execs: u32,
    pub state_seconds: [f64; monitor_common::NUM_STATES],
    pub stall_count: [u64; 3],
    /// `--syscalls`: read calls and their bytes by fd kind.
    pub read_count: [u64; 3],
    pub read_bytes: [u64; 3],
    /// Per-task I/O accounting: read-family calls, bytes they returned, bytes from storage.
    pub task_read_syscalls: u64,
    pub task_read_bytes: u64,
    pub storage_read_bytes: u64,
}

/// Idle seconds by cause.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IdleSeconds {
    pub io: f64,
    pub preprocess: f64,
    pub host: f64,
    pub other: f64,
}

impl IdleSeconds {
    pub fn from_array(a: [f64; 4]) -> Self {
        Self {
            io: a[0],
            preprocess: a[1],
            host: a[2],
            other: a[3],
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuSummary {
    pub gpu: u32,
    pub uuid: String,
    pub model: String,
    #[serde(default)]
    pub pci_bus_id: String,
    pub rank: String,
    pub source: Option<String>,
    pub simulated: bool,
    pub wall_seconds: f64,
    pub busy_seconds: f64,
    pub idle_seconds: IdleSeconds,
    pub idle_total_seconds: f64,
    /// The part of io idle during which the feeder itself was reading.
    #[serde(default)]
    pub io_feeder_seconds: f64,
    pub samples: u64,
    /// Why the GPU went stale during the run, if it did.
    pub stale: Option<String>,
}
