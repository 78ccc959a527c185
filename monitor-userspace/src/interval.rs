//! What changed in an interval: the difference between two [`Snapshot`]s, labelled with jobs,
//! ranks and roles from discovery, as the record's typed `interval` line. Everything downstream
//! (the ledger, and through it `/metrics`, the summary and `stallmon report`) is built from these
//! lines, so the live figures and a report of the record are the same by construction.
use std::collections::{BTreeMap, HashMap};

use monitor_common::{NUM_ROLES, ROLE_LAUNCHER, ROLE_NAMES, tracked_parts};

use crate::{
    collector::{HistTotals, ProcTotals, RoleTotals, Snapshot},
    discover::Jobs,
    schema::{
        SparseHist,
        record::{BlockDelta, IntervalLine, OpenFiles, ProcDelta, ReadDelta, RoleDelta, TaskIo},
    },
};

fn sub<const N: usize>(a: [u64; N], b: [u64; N]) -> [u64; N] {
    std::array::from_fn(|i| a[i].saturating_sub(b[i]))
}

fn hist_delta(cur: &HistTotals, prev: &HistTotals) -> SparseHist {
    SparseHist::from_counts(
        &sub(cur.hist, prev.hist),
        cur.sum_ns.saturating_sub(prev.sum_ns),
    )
}

fn role_name(role: u32) -> &'static str {
    ROLE_NAMES.get(role as usize).copied().unwrap_or("launcher")
}

/// Turns snapshots into interval lines.
#[derive(Default)]
pub struct Deltas {
    prev: Option<Snapshot>,
    /// The last totals read of every slot ever used (a slot reused by a new rank starts from
    /// what its previous rank left).
    slots: HashMap<u32, [RoleTotals; NUM_ROLES]>,
    /// Per process (pid, kernel start time): what was already counted.
    procs: HashMap<(u32, u64), ProcTotals>,
}

impl Deltas {
    pub fn new() -> Self {
        Self::default()
    }

    /// The interval line from the previous snapshot to `cur`.
    pub fn interval(
        &mut self,
        cur: Snapshot,
        jobs: &Jobs,
        open_files: Vec<OpenFiles>,
    ) -> IntervalLine {
        let dt_ns = self
            .prev
            .as_ref()
            .map_or(0, |p| cur.mono_ns.saturating_sub(p.mono_ns));

        let block = cur
            .block
            .iter()
            .map(|((dev, op), c)| {
                let p = self
                    .prev
                    .as_ref()
                    .and_then(|s| s.block.get(&(dev.clone(), *op)))
                    .cloned()
                    .unwrap_or_default();
                BlockDelta {
                    device: dev.clone(),
                    op: op.to_string(),
                    requests: c.count.saturating_sub(p.count),
                    bytes: c.bytes.saturating_sub(p.bytes),
                    errors: c.errors.saturating_sub(p.errors),
                    latency: hist_delta(&c.latency, &p.latency),
                    queue: hist_delta(&c.queue, &p.queue),
                    job_requests: sub(c.job_count, p.job_count),
                    job_bytes: sub(c.job_bytes, p.job_bytes),
                }
            })
            .filter(|b| b.requests != 0 || b.bytes != 0)
            .collect();

        // Per (job, rank, role): slot deltas, then processes' per-task I/O and counts.
        let mut ranks: BTreeMap<(u32, String, u32), RoleDelta> = BTreeMap::new();
        for (&slot, cur_roles) in &cur.slots {
            let Some((job, rank)) = jobs.slot_owner(slot) else {
                continue;
            };
            let prev_roles = self.slots.get(&slot).copied().unwrap_or_default();
            for role in 0..NUM_ROLES {
                let (c, p) = (&cur_roles[role], &prev_roles[role]);
                let d = ranks
                    .entry((job.id, rank.rank.clone(), role as u32))
                    .or_default();
                d.state_ns = sub(c.state_ns, p.state_ns);
                d.stalls = std::array::from_fn(|k| hist_delta(&c.stalls[k], &p.stalls[k]));
                d.reads = c.reads.map(|cr| {
                    let pr = p.reads.unwrap_or_default();
                    std::array::from_fn(|k| ReadDelta {
                        latency: hist_delta(&cr[k].latency, &pr[k].latency),
                        bytes: cr[k].bytes.saturating_sub(pr[k].bytes),
                        errors: cr[k].errors.saturating_sub(pr[k].errors),
                    })
                });
                d.blk_requests = c.blk_count.saturating_sub(p.blk_count);
                d.blk_bytes = c.blk_bytes.saturating_sub(p.blk_bytes);
            }
            self.slots.insert(slot, *cur_roles);
        }
        for job in jobs.iter() {
            for ((rank, role), n) in job.live_counts() {
                ranks.entry((job.id, rank, role)).or_default().processes = n;
            }
        }

        let mut procs = Vec::new();
        for (&pid, p) in &cur.procs {
            let Some(job) = jobs.iter().find(|j| {
                j.procs
                    .get(&pid)
                    .is_some_and(|e| e.start_ns == p.info.start_ns || e.start_ns == 0)
            }) else {
                continue;
            };
            let entry = &job.procs[&pid];
            let (slot, role) = tracked_parts(entry.value);
            let rank = if role == ROLE_LAUNCHER {
                String::new()
            } else {
                job.rank_of_slot(slot)
                    .map(|r| r.rank.clone())
                    .unwrap_or_default()
            };
            let key = (pid, p.info.start_ns);
            let base = self.procs.entry(key).or_insert_with(|| {
                // A process found at attach: only what it does from now on counts.
                let mut b = ProcTotals::default();
                if p.info.start_ns == 0 {
                    b.io = p.io;
                }
                b
            });
            let io = p.io.since(&base.io);
            let d = ProcDelta {
                pid,
                job: job.id,
                rank: rank.clone(),
                role: role_name(role).to_string(),
                parent: p.info.parent_tgid,
                comm: entry.comm.clone(),
                exited: p.info.exited != 0 || entry.exited,
                execs: p.info.execs,
                state_ns: sub(p.info.state_ns, base.info.state_ns),
                stall_count: sub(p.info.stall_count, base.info.stall_count),
                stall_ns: sub(p.info.stall_ns, base.info.stall_ns),
                read_count: sub(p.info.read_count, base.info.read_count),
                read_bytes: sub(p.info.read_bytes, base.info.read_bytes),
                task_io: io,
            };
            *base = p.clone();
            let r = ranks.entry((job.id, rank, role)).or_default();
            r.task_io.add(&io);
            let changed = d.exited
                || d.state_ns.iter().any(|v| *v != 0)
                || d.task_io != TaskIo::default()
                || d.stall_count.iter().any(|v| *v != 0);
            if changed {
                procs.push(d);
            }
        }
        // Forget processes that are gone from the kernel's table.
        self.procs.retain(|(pid, start), _| {
            cur.procs
                .get(pid)
                .is_some_and(|p| p.info.start_ns == *start)
        });

        let ranks = ranks
            .into_iter()
            .map(|((job, rank, role), mut d)| {
                d.job = job;
                d.rank = rank;
                d.role = role_name(role).to_string();
                d
            })
            .collect();
        let line = IntervalLine {
            mono_ns: cur.mono_ns,
            dt_ns,
            block,
            ranks,
            procs,
            drops: cur.drops.to_vec(),
            record_errors: 0,
            open_files,
        };
        self.prev = Some(cur);
        line
    }
}

/// Samples the jobs' open read-only files: directory counts and the disk they are on.
pub fn sample_open_files(jobs: &Jobs, per_job_limit: usize) -> Vec<OpenFiles> {
    let mut out = Vec::new();
    for job in jobs.iter().filter(|j| j.ended.is_none()) {
        let mut dirs: BTreeMap<String, (u64, Option<String>)> = BTreeMap::new();
        for pid in job.live_pids().take(per_job_limit) {
            for (path, dev) in crate::discover::procfs::open_read_files(pid, 256) {
                let Some(parent) = path.parent() else {
                    continue;
                };
                let e = dirs
                    .entry(crate::discover::identity::sanitize(
                        &parent.to_string_lossy(),
                    ))
                    .or_insert((0, None));
                e.0 += 1;
                if e.1.is_none() {
                    e.1 = crate::discover::procfs::disk_of_dev(dev);
                }
            }
        }
        for (dir, (count, device)) in dirs {
            out.push(OpenFiles {
                job: job.id,
                dir,
                count,
                device,
            });
        }
    }
    out
}
