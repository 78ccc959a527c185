//! Collectors: read the kernel maps into cumulative [`Snapshot`]s (on the user's interval) and
//! cheap per-slot worker-state readings (on the fine attribution tick). Nothing here interprets
//! the numbers: what belongs to which job and rank is discovery's business, what changed since
//! the last snapshot is `interval`'s.
use std::collections::{BTreeMap, HashMap};

use monitor_common::{
    HIST_SLOTS, NUM_DROPS, NUM_FD_KINDS, NUM_ROLES, NUM_STATES, OP_NAMES, ProcInfo, ReadStats,
    StallStats, merge::dev_parts,
};

use crate::{
    discover::procfs,
    gpu::monotonic_ns,
    kernel::{Kernel, KernelError},
    schema::record::TaskIo,
};

/// A log2 histogram with the sum of its values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistTotals {
    pub count: u64,
    pub sum_ns: u64,
    pub hist: [u64; HIST_SLOTS],
}

impl From<&StallStats> for HistTotals {
    fn from(s: &StallStats) -> Self {
        Self {
            count: s.count,
            sum_ns: s.sum_ns,
            hist: s.hist,
        }
    }
}

/// `--syscalls`: completed read calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadTotals {
    pub latency: HistTotals,
    pub bytes: u64,
    pub errors: u64,
}

impl From<&ReadStats> for ReadTotals {
    fn from(s: &ReadStats) -> Self {
        Self {
            latency: HistTotals {
                count: s.count,
                sum_ns: s.sum_ns,
                hist: s.hist,
            },
            bytes: s.bytes,
            errors: s.errors,
        }
    }
}

/// One slot's totals for one accounted role, cumulative since the kernel was loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoleTotals {
    /// Time in each state, including the time threads have spent in their current state.
    pub state_ns: [u64; NUM_STATES],
    pub stalls: [HistTotals; NUM_FD_KINDS],
    pub reads: Option<[ReadTotals; NUM_FD_KINDS]>,
    pub blk_count: u64,
    pub blk_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockTotals {
    pub count: u64,
    pub bytes: u64,
    pub errors: u64,
    pub latency: HistTotals,
    pub queue: HistTotals,
    pub job_count: [u64; NUM_ROLES],
    pub job_bytes: [u64; NUM_ROLES],
}

/// One process as the kernel and `/proc` see it.
#[derive(Clone, Debug, Default)]
pub struct ProcTotals {
    pub info: ProcInfo,
    /// Per-task I/O accounting of the process's own threads (exited ones from the kernel, live
    /// ones from `/proc`).
    pub io: TaskIo,
}

/// Cumulative totals at one instant.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub mono_ns: u64,
    /// By (device name, operation name).
    pub block: BTreeMap<(String, &'static str), BlockTotals>,
    pub drops: [u64; NUM_DROPS],
    /// Per slot asked for, per accounted role.
    pub slots: BTreeMap<u32, [RoleTotals; NUM_ROLES]>,
    /// Every process the kernel tracks (live, or exited and not yet forgotten).
    pub procs: BTreeMap<u32, ProcTotals>,
}

/// Threads whose I/O accounting is read per process and interval.
const MAX_THREADS_READ: usize = 512;

/// Reads the kernel's maps.
#[derive(Default)]
pub struct Collector {
    dev_names: HashMap<u32, String>,
}

impl Collector {
    pub fn new() -> Self {
        Self::default()
    }

    fn dev_name(&mut self, dev: u32) -> String {
        self.dev_names
            .entry(dev)
            .or_insert_with(|| {
                let (major, minor) = dev_parts(dev);
                std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"))
                    .ok()
                    .and_then(|u| {
                        u.lines()
                            .find_map(|l| l.strip_prefix("DEVNAME=").map(str::to_string))
                    })
                    .unwrap_or_else(|| format!("{major}:{minor}"))
            })
            .clone()
    }

    /// Time spent in each state by `slot`'s workers so far (closed intervals and open ones up
    /// to now): a couple of map reads per slot, for the fine attribution tick.
    pub fn worker_states(
        &self,
        kernel: &Kernel,
        slots: &[u32],
    ) -> Result<(u64, BTreeMap<u32, [u64; NUM_STATES]>), KernelError> {
        let mut out = BTreeMap::new();
        let mut now = monotonic_ns();
        for &slot in slots {
            let (stats, open) = kernel.slot_role(slot, monitor_common::ROLE_WORKER)?;
            now = monotonic_ns();
            let open = open.open_ns(now);
            out.insert(slot, std::array::from_fn(|s| stats.state_ns[s] + open[s]));
        }
        Ok((now, out))
    }

    /// A full read of every map, for the slots in use.
    pub fn snapshot(&mut self, kernel: &Kernel, slots: &[u32]) -> Result<Snapshot, KernelError> {
        let mut snap = Snapshot::default();
        for &slot in slots {
            let mut roles = [RoleTotals::default(); NUM_ROLES];
            for (role, r) in roles.iter_mut().enumerate() {
                let (stats, open) = kernel.slot_role(slot, role as u32)?;
                let now = monotonic_ns();
                let open = open.open_ns(now);
                r.state_ns = std::array::from_fn(|s| stats.state_ns[s] + open[s]);
                r.blk_count = stats.blk_count;
                r.blk_bytes = stats.blk_bytes;
                r.stalls = kernel
                    .stalls(slot, role as u32)
                    .each_ref()
                    .map(HistTotals::from);
                r.reads = kernel
                    .reads(slot, role as u32)
                    .map(|k| k.each_ref().map(ReadTotals::from));
            }
            snap.slots.insert(slot, roles);
        }
        snap.mono_ns = monotonic_ns();

        for (dev, op, s) in kernel.block() {
            let name = self.dev_name(dev);
            let op = OP_NAMES.get(op).copied().unwrap_or("other");
            snap.block.insert(
                (name, op),
                BlockTotals {
                    count: s.count,
                    bytes: s.bytes,
                    errors: s.errors,
                    latency: HistTotals {
                        count: s.lat_count,
                        sum_ns: s.lat_sum_ns,
                        hist: s.lat_hist,
                    },
                    queue: HistTotals {
                        count: s.queue_count,
                        sum_ns: s.queue_sum_ns,
                        hist: s.queue_hist,
                    },
                    job_count: s.job_count,
                    job_bytes: s.job_bytes,
                },
            );
        }
        snap.drops = kernel.drops();

        for (pid, info) in kernel.procs() {
            // Threads that exited (the kernel added them up) and the live ones.
            let mut io = TaskIo {
                syscr: info.io_syscr,
                rchar: info.io_rchar,
                read_bytes: info.io_read_bytes,
            };
            if info.exited == 0
                && let Some(live) = procfs::threads_io(pid, MAX_THREADS_READ)
            {
                io.add(&live);
            }
            snap.procs.insert(pid, ProcTotals { info, io });
        }
        Ok(snap)
    }
}
