//! The record file (`--record`): JSON lines, one [`Line`] each, tagged with `"type"`.
//!
//! A `header` first; `job` and `rank` lines when jobs and ranks appear (and again when a rank's
//! feeder changes); per fine tick the attribution inputs (`feeder`, `worker_slice`, per GPU poll
//! `gpu`); per interval one `interval` line with every delta a summary is built from; a final
//! `summary`. Each interval line is flushed and synced when written, so a killed tracer (or a
//! crashed host) loses at most the interval in progress: `stallmon report` rebuilds the summary
//! from the interval lines up to the last complete one.
use std::io::BufRead;

use monitor_common::{NUM_FD_KINDS, NUM_STATES};
use serde::{Deserialize, Serialize};

use super::{JobLabels, SparseHist, summary::Summary};

/// Version of this format (the header says which one a file uses).
pub const VERSION: u32 = 2;

/// One line of the record file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Line {
    Header(Header),
    Job(JobLine),
    JobEnd(JobEndLine),
    Rank(RankLine),
    Feeder(FeederLine),
    WorkerSlice(WorkerSliceLine),
    Gpu(GpuLine),
    Interval(IntervalLine),
    Summary(Box<Summary>),
    /// A line of a type this version does not know (from a newer stallmon): ignored.
    #[serde(other)]
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub version: u32,
    pub stallmon: String,
    #[serde(default)]
    pub revision: String,
    /// `trace` or `node`.
    pub mode: String,
    pub start_mono_ns: u64,
    pub interval_s: f64,
    /// `nvml`, `simulated`, or absent when GPU attribution is disabled.
    #[serde(default)]
    pub gpu_source: Option<String>,
    #[serde(default)]
    pub syscalls: bool,
}

/// A job stallmon started following.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobLine {
    /// Run-local job number (labels may repeat across restarts).
    pub job: u32,
    pub labels: JobLabels,
    pub root_pid: u32,
    /// The command line of `stallmon trace -- CMD` (holds whatever the user typed: the record
    /// file is created mode 0600).
    #[serde(default)]
    pub command: Vec<String>,
}

/// A job's processes all exited (or the traced command ended).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobEndLine {
    pub job: u32,
    /// Exit status of a command started by `stallmon trace -- CMD`.
    #[serde(default)]
    pub exit_status: Option<i32>,
}

/// Why a process was chosen as a rank's feeder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeederInfo {
    pub pid: u32,
    /// The thread whose state drives attribution (the main thread unless `--feeder-tid`).
    pub tid: u32,
    pub comm: String,
    /// NVML indices of the GPUs this feeder drives (as far as known).
    #[serde(default)]
    pub gpus: Vec<u32>,
    pub why: String,
}

/// A rank and its slot (a slot is a rank's place in the kernel's per-rank tables; a line with
/// a slot that was in use before starts a new rank there).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankLine {
    pub slot: u32,
    pub job: u32,
    /// The rank label: the global rank from the environment, else its order in the job.
    pub rank: String,
    #[serde(default)]
    pub local_rank: Option<u32>,
    pub feeder: FeederInfo,
}

/// Feeder state changes of one slot, in time order: `(ts_ns, state)` pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeederLine {
    pub slot: u32,
    pub events: Vec<(u64, u32)>,
    /// Every feeder event of this slot before this time is in this or earlier lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ns: Option<u64>,
}

/// Aggregate time of one slot's worker threads in each state over `[start_ns, end_ns)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSliceLine {
    pub slot: u32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub state_ns: [u64; NUM_STATES],
}

/// New utilization samples of one GPU, attributed to the rank in `slot`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuLine {
    pub gpu: u32,
    #[serde(default)]
    pub uuid: String,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub pci_bus_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub slot: u32,
    /// `(end_ns, period_ns, util)` triples.
    pub samples: Vec<(u64, u64, f64)>,
    /// Set when the GPU stopped answering (its figures cover only the samples received).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale: Option<String>,
}

/// Everything that changed in one interval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IntervalLine {
    pub mono_ns: u64,
    pub dt_ns: u64,
    pub block: Vec<BlockDelta>,
    pub ranks: Vec<RoleDelta>,
    pub procs: Vec<ProcDelta>,
    /// Lost events so far, by reason (`monitor_common::DROP_NAMES` order).
    pub drops: Vec<u64>,
    /// Record lines that could not be written so far.
    #[serde(default)]
    pub record_errors: u64,
    /// Where the jobs' open read-only files are: per job, directory and its device.
    #[serde(default)]
    pub open_files: Vec<OpenFiles>,
}

/// Sampled open files of one job: how often each directory was seen, and the disk it is on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenFiles {
    pub job: u32,
    pub dir: String,
    pub count: u64,
    #[serde(default)]
    pub device: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockDelta {
    pub device: String,
    pub op: String,
    pub requests: u64,
    pub bytes: u64,
    pub errors: u64,
    pub latency: SparseHist,
    pub queue: SparseHist,
    /// Requests and bytes submitted by tracked jobs, by role (feeder, worker).
    pub job_requests: [u64; 2],
    pub job_bytes: [u64; 2],
}

/// Per job, rank and accounted role.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoleDelta {
    pub job: u32,
    pub rank: String,
    pub role: String,
    pub state_ns: [u64; NUM_STATES],
    /// Read stalls by fd kind.
    pub stalls: [SparseHist; NUM_FD_KINDS],
    /// `--syscalls`: completed reads by fd kind (`count`, `sum_ns`, histogram) and their bytes.
    #[serde(default)]
    pub reads: Option<[ReadDelta; NUM_FD_KINDS]>,
    pub blk_requests: u64,
    pub blk_bytes: u64,
    /// The kernel's per-task I/O accounting of the role's processes.
    pub task_io: TaskIo,
    /// Live processes now.
    pub processes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadDelta {
    pub latency: SparseHist,
    pub bytes: u64,
    pub errors: u64,
}

/// `/proc/PID/io`: read-family calls, bytes they returned, bytes fetched from storage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskIo {
    pub syscr: u64,
    pub rchar: u64,
    pub read_bytes: u64,
}

impl TaskIo {
    pub fn add(&mut self, o: &TaskIo) {
        self.syscr += o.syscr;
        self.rchar += o.rchar;
        self.read_bytes += o.read_bytes;
    }

    pub fn since(&self, earlier: &TaskIo) -> TaskIo {
        TaskIo {
            syscr: self.syscr.saturating_sub(earlier.syscr),
            rchar: self.rchar.saturating_sub(earlier.rchar),
            read_bytes: self.read_bytes.saturating_sub(earlier.read_bytes),
        }
    }
}

/// Per process (the record's per-process detail; metrics never carry PIDs).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcDelta {
    pub pid: u32,
    pub job: u32,
    pub rank: String,
    pub role: String,
    pub parent: u32,
    pub comm: String,
    pub exited: bool,
    pub execs: u32,
    pub state_ns: [u64; NUM_STATES],
    pub stall_count: [u64; NUM_FD_KINDS],
    pub stall_ns: [u64; NUM_FD_KINDS],
    #[serde(default)]
    pub read_count: [u64; NUM_FD_KINDS],
    #[serde(default)]
    pub read_bytes: [u64; NUM_FD_KINDS],
    pub task_io: TaskIo,
}

/// A problem reading a record, with the line it happened on.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("line {line}: {source}")]
    Io {
        line: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("line {line}: not a stallmon record line: {source}")]
    Parse {
        line: usize,
        #[source]
        source: serde_json::Error,
    },
}

/// The outcome of reading one line.
pub enum Item {
    Line(Line),
    /// A line that does not parse, and there is more after it: the file is damaged there.
    Bad(ReadError),
}

/// Streams the lines of a record, in order, reading the input once (pipes work). Blank lines
/// are ignored. A line that does not parse is reported as [`Item::Bad`] and reading goes on; a
/// last line that does not parse (a tracer killed mid-write) is dropped, and
/// [`Reader::truncated_tail`] says so.
pub struct Reader<R> {
    lines: std::iter::Enumerate<std::io::Lines<R>>,
    pending: Option<(usize, serde_json::Error)>,
    queue: std::collections::VecDeque<Item>,
    pub truncated_tail: bool,
    done: bool,
}

impl<R: BufRead> Reader<R> {
    pub fn new(input: R) -> Self {
        Self {
            lines: input.lines().enumerate(),
            pending: None,
            queue: Default::default(),
            truncated_tail: false,
            done: false,
        }
    }
}

impl<R: BufRead> Iterator for Reader<R> {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        loop {
            if let Some(item) = self.queue.pop_front() {
                return Some(item);
            }
            if self.done {
                return None;
            }
            let Some((i, line)) = self.lines.next() else {
                self.done = true;
                self.truncated_tail = self.pending.take().is_some();
                continue;
            };
            let line = match line {
                Ok(l) => l,
                Err(source) => {
                    self.done = true;
                    self.queue.push_back(Item::Bad(ReadError::Io {
                        line: i + 1,
                        source,
                    }));
                    continue;
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            if let Some((n, source)) = self.pending.take() {
                // The bad line was not the last one: the file is damaged there.
                self.queue
                    .push_back(Item::Bad(ReadError::Parse { line: n, source }));
            }
            match serde_json::from_str::<Line>(&line) {
                Ok(l) => self.queue.push_back(Item::Line(l)),
                Err(e) => self.pending = Some((i + 1, e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> (Vec<String>, Vec<usize>, bool) {
        let mut r = Reader::new(text.as_bytes());
        let mut kinds = Vec::new();
        let mut bad = Vec::new();
        for item in r.by_ref() {
            match item {
                Item::Line(l) => {
                    kinds.push(format!("{l:?}").split('(').next().unwrap().to_string())
                }
                Item::Bad(ReadError::Parse { line, .. }) => bad.push(line),
                Item::Bad(e) => panic!("{e}"),
            }
        }
        (kinds, bad, r.truncated_tail)
    }

    #[test]
    fn truncated_tail_and_damaged_lines() {
        let ok = r#"{"type":"feeder","slot":0,"events":[[1,0]]}"#;
        let text = format!("{ok}\n\n{{\"type\":\"fee\n{ok}\n{{\"type\":\"gpu\",\"gp");
        let (kinds, bad, truncated) = lines(&text);
        assert_eq!(kinds, ["Feeder", "Feeder"]);
        assert_eq!(bad, [3]);
        assert!(truncated);
        let (kinds, bad, truncated) = lines(&format!("{ok}\n{{\"type\":\"from_the_future\"}}\n"));
        assert_eq!(kinds, ["Feeder", "Unknown"]);
        assert!(bad.is_empty() && !truncated);
    }
}
