//! Collectors: read the kernel maps into cumulative [`Snapshot`]s (on the exporter's interval)
//! and cheap per-role state readings plus the feeder's state changes (on the fine attribution
//! tick). Nothing here interprets the numbers; that is the attribution's and exporters' job.
use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result};
use monitor_common::{
    FeederEvent, NUM_DROPS, NUM_FD_KINDS, NUM_ROLES, NUM_STATES, OP_NAMES, ROLE_FEEDER, RoleStats,
    open_index,
};
use serde::Serialize;

use crate::{hist::Log2Hist, kernel::Kernel};

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer, valid clock id.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ReadTotals {
    pub count: u64,
    pub bytes: u64,
    pub errors: u64,
    pub sum_ns: u64,
    pub hist: Log2Hist,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct RoleTotals {
    /// Time in each state, including the open intervals of threads still in that state.
    pub state_ns: [u64; NUM_STATES],
    pub read: [ReadTotals; NUM_FD_KINDS],
    /// Block requests (and bytes) submitted by processes of this role.
    pub blk_count: u64,
    pub blk_bytes: u64,
    /// Live tracked processes of this role.
    pub processes: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct BlockTotals {
    pub count: u64,
    pub bytes: u64,
    pub errors: u64,
    pub lat_count: u64,
    pub lat_sum_ns: u64,
    pub queue_count: u64,
    pub queue_sum_ns: u64,
    pub job_count: [u64; NUM_ROLES],
    pub job_bytes: [u64; NUM_ROLES],
    pub latency: Log2Hist,
    pub queue: Log2Hist,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ProcTotals {
    pub pid: u32,
    pub role: u32,
    pub parent: u32,
    pub comm: String,
    pub state_ns: [u64; NUM_STATES],
    pub read_count: [u64; NUM_FD_KINDS],
    pub read_bytes: [u64; NUM_FD_KINDS],
    pub read_ns: [u64; NUM_FD_KINDS],
    pub blk_count: u64,
    pub blk_bytes: u64,
    pub execs: u32,
    pub exited: bool,
}

/// Cumulative totals since the tracer attached.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Snapshot {
    pub mono_ns: u64,
    pub roles: [RoleTotals; NUM_ROLES],
    /// By (device name, operation name).
    pub block: BTreeMap<(String, String), BlockTotals>,
    pub drops: [u64; NUM_DROPS],
    /// Every process tracked so far, live or exited.
    pub procs: BTreeMap<u32, ProcTotals>,
    pub target_alive: bool,
}

pub struct Collector {
    kernel: Kernel,
    target: u32,
    dev_names: HashMap<u32, String>,
    comms: HashMap<u32, String>,
    /// Processes that exited: their final totals (the kernel entry is gone).
    retired: BTreeMap<u32, ProcTotals>,
}

impl Collector {
    pub fn new(kernel: Kernel, target: u32) -> Self {
        Self {
            kernel,
            target,
            dev_names: HashMap::new(),
            comms: HashMap::new(),
            retired: BTreeMap::new(),
        }
    }

    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    pub fn kernel_mut(&mut self) -> &mut Kernel {
        &mut self.kernel
    }

    fn role_stats(&self, role: u32) -> Result<RoleStats> {
        let per_cpu = self
            .kernel
            .role_stats
            .get(&role, 0)
            .context("reading ROLE_STATS")?;
        let mut it = per_cpu.iter();
        let mut acc = *it.next().context("no CPUs")?;
        for s in it {
            for i in 0..NUM_STATES {
                acc.state_ns[i] += s.state_ns[i];
            }
            for k in 0..NUM_FD_KINDS {
                let (a, b) = (&mut acc.read[k], &s.read[k]);
                a.count += b.count;
                a.bytes += b.bytes;
                a.errors += b.errors;
                a.sum_ns += b.sum_ns;
                for (x, y) in a.hist.iter_mut().zip(b.hist.iter()) {
                    *x += y;
                }
            }
            acc.blk_count += s.blk_count;
            acc.blk_bytes += s.blk_bytes;
        }
        Ok(acc)
    }

    /// Time spent in each state per role so far (closed intervals + open ones up to now). Cheap:
    /// a handful of map reads, meant for the fine attribution tick.
    pub fn role_states(&self) -> Result<(u64, [[u64; NUM_STATES]; NUM_ROLES])> {
        let mut out = [[0u64; NUM_STATES]; NUM_ROLES];
        for (role, row) in out.iter_mut().enumerate() {
            *row = self.role_stats(role as u32)?.state_ns;
        }
        let now = monotonic_ns();
        for (role, row) in out.iter_mut().enumerate() {
            for (state, v) in row.iter_mut().enumerate() {
                let i = open_index(role as u32, state as u32) as u32;
                let n = self.kernel.role_open.get(&i, 0).unwrap_or(0);
                let sum = self.kernel.role_open.get(&(i + 1), 0).unwrap_or(0);
                // open = n * now - sum(since); wrapping because the kernel subtracts by adding.
                let open = n.wrapping_mul(now).wrapping_sub(sum) as i64;
                if open > 0 {
                    *v += open as u64;
                }
            }
        }
        Ok((now, out))
    }

    /// State changes of the feeder thread since the last call, in time order.
    pub fn drain_feeder(&mut self) -> Vec<FeederEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.kernel.feeder_events.next() {
            if item.len() >= size_of::<FeederEvent>() {
                // SAFETY: the kernel writes whole FeederEvent records; read unaligned.
                let ev = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const FeederEvent) };
                out.push(ev);
            }
        }
        out.sort_by_key(|e| e.ts_ns);
        out
    }

    fn dev_name(&mut self, dev: u32) -> String {
        self.dev_names
            .entry(dev)
            .or_insert_with(|| {
                let (major, minor) = (dev >> 20, dev & 0xfffff);
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

    fn comm(&mut self, pid: u32) -> String {
        self.comms
            .entry(pid)
            .or_insert_with(|| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default()
            })
            .clone()
    }

    /// Full read of every map. Exited processes are read one last time, then removed from the
    /// kernel map and kept as retired totals.
    pub fn snapshot(&mut self) -> Result<Snapshot> {
        let (mono_ns, states) = self.role_states()?;
        let mut snap = Snapshot {
            mono_ns,
            ..Snapshot::default()
        };
        for (role, (r, st)) in snap.roles.iter_mut().zip(states).enumerate() {
            let rs = self.role_stats(role as u32)?;
            r.state_ns = st;
            for k in 0..NUM_FD_KINDS {
                let s = &rs.read[k];
                r.read[k] = ReadTotals {
                    count: s.count,
                    bytes: s.bytes,
                    errors: s.errors,
                    sum_ns: s.sum_ns,
                    hist: Log2Hist::from_counts(s.hist),
                };
            }
            r.blk_count = rs.blk_count;
            r.blk_bytes = rs.blk_bytes;
        }

        // Block layer.
        let mut stats = Vec::new();
        for item in self.kernel.block_stats.iter() {
            let (key, per_cpu) = item.context("reading BLOCK_STATS")?;
            stats.push((key, per_cpu.iter().copied().collect::<Vec<_>>()));
        }
        for (key, per_cpu) in stats {
            let name = self.dev_name(key.dev);
            let op = OP_NAMES.get(key.op as usize).copied().unwrap_or("other");
            let b = snap.block.entry((name, op.to_string())).or_default();
            for s in per_cpu {
                b.count += s.count;
                b.bytes += s.bytes;
                b.errors += s.errors;
                b.lat_count += s.lat_count;
                b.lat_sum_ns += s.lat_sum_ns;
                b.queue_count += s.queue_count;
                b.queue_sum_ns += s.queue_sum_ns;
                for r in 0..NUM_ROLES {
                    b.job_count[r] += s.job_count[r];
                    b.job_bytes[r] += s.job_bytes[r];
                }
                b.latency.add(&Log2Hist::from_counts(s.lat_hist));
                b.queue.add(&Log2Hist::from_counts(s.queue_hist));
            }
        }
        for (i, d) in snap.drops.iter_mut().enumerate() {
            *d = self
                .kernel
                .drops
                .get(&(i as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0);
        }

        // Processes.
        let mut live = Vec::new();
        for item in self.kernel.procs.iter() {
            let (pid, info) = item.context("reading PROCS")?;
            live.push((pid, info));
        }
        let mut exited = Vec::new();
        for (pid, info) in live {
            let gone = info.exited != 0 || !std::path::Path::new(&format!("/proc/{pid}")).exists();
            let p = ProcTotals {
                pid,
                role: info.role,
                parent: info.parent_tgid,
                comm: self.comm(pid),
                state_ns: info.state_ns,
                read_count: info.read_count,
                read_bytes: info.read_bytes,
                read_ns: info.read_ns,
                blk_count: info.blk_count,
                blk_bytes: info.blk_bytes,
                execs: info.execs,
                exited: gone,
            };
            if gone {
                exited.push(pid);
            } else if let Some(r) = snap.roles.get_mut(info.role as usize) {
                r.processes += 1;
            }
            if pid == self.target {
                snap.target_alive = !gone;
            }
            snap.procs.insert(pid, p);
        }
        for pid in exited {
            self.kernel.untrack(pid);
            if let Some(p) = snap.procs.get(&pid) {
                self.retired.insert(pid, p.clone());
            }
            self.comms.remove(&pid);
        }
        for (pid, p) in &self.retired {
            snap.procs.entry(*pid).or_insert_with(|| p.clone());
        }
        Ok(snap)
    }

    /// The target's role is always the feeder.
    pub fn target(&self) -> u32 {
        self.target
    }
}

/// Role index of the feeder, for readability at call sites.
pub const FEEDER: usize = ROLE_FEEDER as usize;
