//! The run's running totals, folded from record lines: what `/metrics`, the exit summary and
//! `stallmon report` show. Live, the session applies each line as it writes it; offline,
//! `report` applies the lines it reads back: one fold, so both give the same figures.
use std::collections::BTreeMap;

use monitor_common::{HIST_SLOTS, NUM_FD_KINDS, NUM_STATES};

use crate::{
    collector::{HistTotals, ReadTotals},
    schema::{
        JobLabels, SparseHist,
        record::{FeederInfo, Header, Line, ProcDelta, RoleDelta, TaskIo},
    },
};

/// Processes kept per job for the summary; older exited ones are counted, not kept.
pub const MAX_PROCS_KEPT: usize = 1000;

impl HistTotals {
    pub fn add_sparse(&mut self, d: &SparseHist) {
        self.count += d.count;
        self.sum_ns += d.sum_ns;
        for &(s, c) in &d.slots {
            let i = (s as usize).min(HIST_SLOTS - 1);
            self.hist[i] += c;
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct BlockAcc {
    pub requests: u64,
    pub bytes: u64,
    pub errors: u64,
    pub latency: HistTotals,
    pub queue: HistTotals,
    pub job_requests: [u64; 2],
    pub job_bytes: [u64; 2],
}

#[derive(Clone, Debug, Default)]
pub struct RoleAcc {
    pub state_ns: [u64; NUM_STATES],
    pub stalls: [HistTotals; NUM_FD_KINDS],
    pub reads: Option<[ReadTotals; NUM_FD_KINDS]>,
    pub blk_requests: u64,
    pub blk_bytes: u64,
    pub task_io: TaskIo,
    /// Live processes at the last interval.
    pub processes: u64,
}

impl RoleAcc {
    fn add(&mut self, d: &RoleDelta) {
        for (a, b) in self.state_ns.iter_mut().zip(d.state_ns) {
            *a += b;
        }
        for (a, b) in self.stalls.iter_mut().zip(&d.stalls) {
            a.add_sparse(b);
        }
        if let Some(reads) = &d.reads {
            let acc = self.reads.get_or_insert_with(Default::default);
            for (a, b) in acc.iter_mut().zip(reads) {
                a.latency.add_sparse(&b.latency);
                a.bytes += b.bytes;
                a.errors += b.errors;
            }
        }
        self.blk_requests += d.blk_requests;
        self.blk_bytes += d.blk_bytes;
        self.task_io.add(&d.task_io);
        self.processes = d.processes;
    }
}

#[derive(Clone, Debug, Default)]
pub struct ProcAcc {
    pub rank: String,
    pub role: String,
    pub parent: u32,
    pub comm: String,
    pub exited: bool,
    pub execs: u32,
    pub state_ns: [u64; NUM_STATES],
    pub stall_count: [u64; NUM_FD_KINDS],
    pub stall_ns: [u64; NUM_FD_KINDS],
    pub read_count: [u64; NUM_FD_KINDS],
    pub read_bytes: [u64; NUM_FD_KINDS],
    pub task_io: TaskIo,
}

impl ProcAcc {
    fn add(&mut self, d: &ProcDelta) {
        self.rank.clone_from(&d.rank);
        self.role.clone_from(&d.role);
        self.parent = d.parent;
        self.comm.clone_from(&d.comm);
        self.exited |= d.exited;
        self.execs = d.execs;
        let add = |a: &mut [u64], b: &[u64]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        add(&mut self.state_ns, &d.state_ns);
        add(&mut self.stall_count, &d.stall_count);
        add(&mut self.stall_ns, &d.stall_ns);
        add(&mut self.read_count, &d.read_count);
        add(&mut self.read_bytes, &d.read_bytes);
        self.task_io.add(&d.task_io);
    }
}

#[derive(Clone, Debug, Default)]
pub struct RankMeta {
    pub slot: u32,
    pub local_rank: Option<u32>,
    pub feeders: Vec<FeederInfo>,
}

#[derive(Clone, Debug, Default)]
pub struct JobAcc {
    pub labels: JobLabels,
    pub root_pid: u32,
    pub command: Vec<String>,
    pub ended: bool,
    pub exit_status: Option<i32>,
    pub ranks: BTreeMap<String, RankMeta>,
    /// By (rank label, role name); launchers have rank "".
    pub roles: BTreeMap<(String, String), RoleAcc>,
    pub procs: BTreeMap<u32, ProcAcc>,
    pub procs_omitted: u64,
    /// Processes seen and exited by role, including omitted ones.
    pub seen: BTreeMap<String, (u64, u64)>,
    /// Directory → (times seen open, disk).
    pub dirs: BTreeMap<String, (u64, Option<String>)>,
}

impl JobAcc {
    /// The directory the job's open files were most often in.
    pub fn hottest_path(&self) -> Option<String> {
        self.dirs
            .iter()
            .max_by_key(|(d, (n, _))| (*n, std::cmp::Reverse((*d).clone())))
            .map(|(d, _)| d.clone())
    }

    /// The disk the job's files most often live on.
    pub fn data_device(&self) -> Option<String> {
        let mut by_dev: BTreeMap<&str, u64> = BTreeMap::new();
        for (n, dev) in self.dirs.values() {
            if let Some(d) = dev {
                *by_dev.entry(d).or_default() += n;
            }
        }
        by_dev
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(d, _)| d.to_string())
    }
}

/// Identity and health of a GPU as recorded.
#[derive(Clone, Debug, Default)]
pub struct GpuMeta {
    pub uuid: String,
    pub model: String,
    pub pci_bus_id: String,
    pub source: Option<String>,
    pub stale: Option<String>,
}

/// Everything folded so far.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    pub header: Option<Header>,
    pub first_mono_ns: Option<u64>,
    pub last_mono_ns: u64,
    pub intervals: u64,
    pub block: BTreeMap<(String, String), BlockAcc>,
    pub drops: Vec<u64>,
    pub record_errors: u64,
    pub jobs: BTreeMap<u32, JobAcc>,
    pub gpus: BTreeMap<u32, GpuMeta>,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Seconds covered by the interval lines so far.
    pub fn covered_seconds(&self) -> f64 {
        let start = self
            .header
            .as_ref()
            .map(|h| h.start_mono_ns)
            .or(self.first_mono_ns)
            .unwrap_or(self.last_mono_ns);
        self.last_mono_ns.saturating_sub(start) as f64 * 1e-9
    }

    pub fn apply(&mut self, line: &Line) {
        match line {
            Line::Header(h) => self.header = Some(h.clone()),
            Line::Job(j) => {
                let acc = self.jobs.entry(j.job).or_default();
                acc.labels = j.labels.clone();
                acc.root_pid = j.root_pid;
                acc.command = j.command.clone();
            }
            Line::JobEnd(e) => {
                let acc = self.jobs.entry(e.job).or_default();
                acc.ended = true;
                if e.exit_status.is_some() {
                    acc.exit_status = e.exit_status;
                }
            }
            Line::Rank(r) => {
                let acc = self.jobs.entry(r.job).or_default();
                let meta = acc.ranks.entry(r.rank.clone()).or_default();
                meta.slot = r.slot;
                meta.local_rank = r.local_rank.or(meta.local_rank);
                if meta.feeders.last() != Some(&r.feeder) {
                    meta.feeders.push(r.feeder.clone());
                }
            }
            Line::Gpu(g) => {
                let m = self.gpus.entry(g.gpu).or_default();
                m.uuid.clone_from(&g.uuid);
                m.model.clone_from(&g.model);
                m.pci_bus_id.clone_from(&g.pci_bus_id);
                if g.source.is_some() {
                    m.source.clone_from(&g.source);
                }
                if g.stale.is_some() && m.stale.is_none() {
                    m.stale.clone_from(&g.stale);
                }
            }
            Line::Interval(i) => {
                self.intervals += 1;
                self.first_mono_ns.get_or_insert(i.mono_ns);
                self.last_mono_ns = self.last_mono_ns.max(i.mono_ns);
                for b in &i.block {
                    let acc = self
                        .block
                        .entry((b.device.clone(), b.op.clone()))
                        .or_default();
                    acc.requests += b.requests;
                    acc.bytes += b.bytes;
                    acc.errors += b.errors;
                    acc.latency.add_sparse(&b.latency);
                    acc.queue.add_sparse(&b.queue);
                    for r in 0..2 {
                        acc.job_requests[r] += b.job_requests[r];
                        acc.job_bytes[r] += b.job_bytes[r];
                    }
                }
                for r in &i.ranks {
                    self.jobs
                        .entry(r.job)
                        .or_default()
                        .roles
                        .entry((r.rank.clone(), r.role.clone()))
                        .or_default()
                        .add(r);
                }
                for p in &i.procs {
                    let job = self.jobs.entry(p.job).or_default();
                    let new = !job.procs.contains_key(&p.pid);
                    let acc = job.procs.entry(p.pid).or_default();
                    let was_exited = acc.exited;
                    acc.add(p);
                    let seen = job.seen.entry(p.role.clone()).or_default();
                    if new {
                        seen.0 += 1;
                    }
                    if p.exited && !was_exited {
                        seen.1 += 1;
                    }
                    if job.procs.len() > MAX_PROCS_KEPT
                        && let Some(&old) =
                            job.procs.iter().find(|(_, a)| a.exited).map(|(pid, _)| pid)
                    {
                        job.procs.remove(&old);
                        job.procs_omitted += 1;
                    }
                }
                for f in &i.open_files {
                    let e = self
                        .jobs
                        .entry(f.job)
                        .or_default()
                        .dirs
                        .entry(f.dir.clone())
                        .or_insert((0, None));
                    e.0 += f.count;
                    if e.1.is_none() {
                        e.1.clone_from(&f.device);
                    }
                }
                self.drops.clone_from(&i.drops);
                self.record_errors = self.record_errors.max(i.record_errors);
            }
            _ => {}
        }
    }

    /// Drops a forgotten job.
    pub fn forget_job(&mut self, job: u32) {
        self.jobs.remove(&job);
    }
}
