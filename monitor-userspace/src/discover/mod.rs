//! Jobs and roles, found rather than assumed: which processes belong to which job, which process
//! feeds which rank's GPU, which are that rank's workers and which are launchers. This stage
//! reads `/proc` and the GPUs' context lists, decides ([`roles`]), and tells the kernel (each
//! process's `TRACKED` value: rank slot and role). The kernel follows forks on its own; this
//! stage re-examines a job when processes exec or exit and on every interval.
pub mod identity;
pub mod node;
pub mod procfs;
pub mod roles;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::{Duration, Instant},
};

use monitor_common::{
    EVENT_EXEC, EVENT_EXIT, EVENT_FORK, Event, ProcInfo, ROLE_FEEDER, ROLE_LAUNCHER, ROLE_WORKER,
    abi, tracked_parts, tracked_value,
};

use crate::{
    kernel::{Kernel, KernelError},
    schema::{JobLabels, record::FeederInfo},
};
use identity::{EnvFacts, JobKey};
use roles::{Inputs, ProcView, Role};

/// How discovery behaves.
#[derive(Clone, Debug)]
pub struct DiscoverConfig {
    /// Rank slots the kernel was loaded with.
    pub max_slots: u32,
    /// `--feeder-tid`: this thread feeds rank "0" (trace mode).
    pub feeder_tid: Option<u32>,
    /// How long an ended job's final series stay exported (node mode).
    pub forget_after: Duration,
}

/// One process of a job.
#[derive(Clone, Debug)]
pub struct ProcEntry {
    pub parent: u32,
    pub comm: String,
    /// `task_struct.start_time` as the kernel saw it at fork (0 for processes found at attach).
    pub start_ns: u64,
    /// The `TRACKED` value stallmon set (or the kernel derived at fork).
    pub value: u32,
    /// Cached environment facts (re-read after an exec).
    env: Option<EnvFacts>,
    pub exited: bool,
}

/// A rank and the slot its statistics live in.
#[derive(Clone, Debug)]
pub struct RankEntry {
    pub slot: u32,
    pub rank: String,
    pub local_rank: Option<u32>,
    /// The current feeder (None once it exited and no other process took over).
    pub feeder: Option<FeederInfo>,
    /// Every feeder this rank had, in order.
    pub history: Vec<FeederInfo>,
}

/// A job being followed.
#[derive(Clone, Debug)]
pub struct Job {
    pub id: u32,
    pub labels: JobLabels,
    pub root: u32,
    pub command: Vec<String>,
    pub key: Option<JobKey>,
    pub procs: BTreeMap<u32, ProcEntry>,
    pub ranks: BTreeMap<String, RankEntry>,
    /// When every process of the job had exited.
    pub ended: Option<Instant>,
    /// The job's name is its command's (nothing named it): a rank's environment may still
    /// (torchrun and srun give the run or job id to the ranks, not to themselves).
    pub name_open: bool,
    /// A feeder was once chosen from rank variables or a GPU context.
    ranked: bool,
    dirty: bool,
}

impl Job {
    /// Live processes by rank label ("" for launchers) and role.
    pub fn live_counts(&self) -> BTreeMap<(String, u32), u64> {
        let slot_rank: HashMap<u32, &str> = self
            .ranks
            .values()
            .map(|r| (r.slot, r.rank.as_str()))
            .collect();
        let mut out = BTreeMap::new();
        for p in self.procs.values().filter(|p| !p.exited) {
            let (slot, role) = tracked_parts(p.value);
            let rank = if role == ROLE_LAUNCHER {
                ""
            } else {
                slot_rank.get(&slot).copied().unwrap_or("")
            };
            *out.entry((rank.to_string(), role)).or_default() += 1;
        }
        out
    }

    /// The rank label of a slot of this job.
    pub fn rank_of_slot(&self, slot: u32) -> Option<&RankEntry> {
        self.ranks.values().find(|r| r.slot == slot)
    }

    pub fn live_pids(&self) -> impl Iterator<Item = u32> + '_ {
        self.procs
            .iter()
            .filter(|(_, p)| !p.exited)
            .map(|(pid, _)| *pid)
    }
}

/// What changed in a discovery pass (for the log, the record and the exporter).
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// A rank appeared or got a new feeder.
    Feeder { job: u32, rank: String, slot: u32 },
    /// A rank could not get a slot (more ranks than `--max-ranks`).
    NoSlot { job: u32, rank: String },
    /// The job's labels changed (a rank's environment named it).
    Relabeled(u32),
    /// Every process of the job exited.
    Ended(u32),
    /// An ended job was forgotten (its series go).
    Forgotten(u32),
}

/// Every job followed, and the rank slots.
pub struct Jobs {
    config: DiscoverConfig,
    jobs: BTreeMap<u32, Job>,
    free_slots: BTreeSet<u32>,
    slot_job: HashMap<u32, u32>,
    next_job: u32,
    warned_no_slot: BTreeSet<(u32, String)>,
}

impl Jobs {
    pub fn new(config: DiscoverConfig) -> Self {
        Self {
            free_slots: (0..config.max_slots).collect(),
            config,
            jobs: BTreeMap::new(),
            slot_job: HashMap::new(),
            next_job: 1,
            warned_no_slot: BTreeSet::new(),
        }
    }

    pub fn get(&self, job: u32) -> Option<&Job> {
        self.jobs.get(&job)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    /// The job and rank occupying `slot`.
    pub fn slot_owner(&self, slot: u32) -> Option<(&Job, &RankEntry)> {
        let job = self.jobs.get(self.slot_job.get(&slot)?)?;
        Some((job, job.rank_of_slot(slot)?))
    }

    /// Slots in use: (slot, job, rank label).
    pub fn slots(&self) -> Vec<(u32, u32, String)> {
        let mut out: Vec<(u32, u32, String)> = self
            .jobs
            .values()
            .flat_map(|j| {
                j.ranks
                    .values()
                    .map(move |r| (r.slot, j.id, r.rank.clone()))
            })
            .collect();
        out.sort();
        out
    }

    /// The job `pid` belongs to.
    pub fn job_of(&self, pid: u32) -> Option<u32> {
        self.jobs
            .values()
            .find(|j| j.procs.get(&pid).is_some_and(|p| !p.exited))
            .map(|j| j.id)
    }

    /// Starts following the process tree below (and including) `root` as a new job.
    pub fn add_job(
        &mut self,
        kernel: &mut Kernel,
        root: u32,
        labels: JobLabels,
        command: Vec<String>,
        key: Option<JobKey>,
    ) -> Result<u32, KernelError> {
        let id = self.next_job;
        self.next_job += 1;
        self.jobs.insert(
            id,
            Job {
                id,
                labels,
                root,
                command,
                key,
                procs: BTreeMap::new(),
                ranks: BTreeMap::new(),
                ended: None,
                name_open: false,
                ranked: false,
                dirty: true,
            },
        );
        self.adopt(kernel, id, root)?;
        Ok(id)
    }

    /// Lets the environment of `job`'s ranks name it (its labels came from its command only).
    pub fn open_name(&mut self, job: u32) {
        if let Some(j) = self.jobs.get_mut(&job) {
            j.name_open = true;
        }
    }

    /// Tracks `root` and its live descendants as processes of `job` (launchers until the next
    /// pass gives them their roles). Track first, then scan: a fork at any moment is either
    /// seen by the kernel or found by the scan.
    pub fn adopt(&mut self, kernel: &mut Kernel, job: u32, root: u32) -> Result<(), KernelError> {
        let launcher = tracked_value(job, ROLE_LAUNCHER);
        let stat = procfs::stat(root);
        let parent = stat.as_ref().map_or(0, |s| s.ppid);
        kernel.track(root, launcher, parent)?;
        let mut found = vec![(root, parent, stat.map(|s| s.comm).unwrap_or_default())];
        let table = procfs::all();
        for (pid, parent) in procfs::descendants_in(&table, root) {
            kernel.track(pid, launcher, parent)?;
            found.push((
                pid,
                parent,
                table.get(&pid).map(|s| s.comm.clone()).unwrap_or_default(),
            ));
        }
        let j = self.jobs.get_mut(&job).expect("job exists");
        for (pid, parent, comm) in found {
            j.procs.entry(pid).or_insert(ProcEntry {
                parent,
                comm,
                start_ns: 0,
                value: launcher,
                env: None,
                exited: false,
            });
        }
        j.dirty = true;
        j.ended = None;
        Ok(())
    }

    /// Which job a process the kernel tracks belongs to, from the value it got at fork.
    fn job_of_value(&self, value: u32) -> Option<u32> {
        let (slot, role) = tracked_parts(value);
        if role == ROLE_LAUNCHER {
            self.jobs.contains_key(&slot).then_some(slot)
        } else {
            self.slot_job.get(&slot).copied()
        }
    }

    /// Takes the kernel's events (exec, exit, a launcher's fork) and, with `procs`, its full
    /// process list. Returns the processes that vanished without the kernel seeing them exit
    /// (see [`Kernel::forget_vanished`]).
    pub fn observe(&mut self, events: &[Event], procs: Option<&[(u32, ProcInfo)]>) -> Vec<u32> {
        for e in events {
            match e.kind {
                EVENT_EXEC => {
                    if let Some(j) = self.job_of(e.tgid).and_then(|j| self.jobs.get_mut(&j)) {
                        if let Some(p) = j.procs.get_mut(&e.tgid) {
                            p.env = None; // a new program, maybe a new environment
                            p.comm = procfs::stat(e.tgid).map(|s| s.comm).unwrap_or_default();
                        }
                        j.dirty = true;
                    } else if let Some(parent) = procfs::stat(e.tgid).map(|s| s.ppid)
                        && let Some(j) = self.job_of(parent)
                    {
                        // Forked and exec'd since the last full pass.
                        let j = self.jobs.get_mut(&j).expect("job exists");
                        j.procs.insert(
                            e.tgid,
                            ProcEntry {
                                parent,
                                comm: procfs::stat(e.tgid).map(|s| s.comm).unwrap_or_default(),
                                start_ns: 0,
                                value: tracked_value(j.id, ROLE_LAUNCHER),
                                env: None,
                                exited: false,
                            },
                        );
                        j.dirty = true;
                    }
                }
                EVENT_FORK => {
                    // A launcher's new child: given its role at this tick's pass, not the
                    // next full one (it may fork a rank's DataLoader workers at once).
                    let (child, parent) = (e.tgid, e.tid);
                    if self.job_of(child).is_none()
                        && let Some(j) = self.job_of(parent)
                    {
                        let j = self.jobs.get_mut(&j).expect("job exists");
                        j.procs.insert(
                            child,
                            ProcEntry {
                                parent,
                                comm: procfs::stat(child).map(|s| s.comm).unwrap_or_default(),
                                start_ns: 0,
                                value: tracked_value(j.id, ROLE_LAUNCHER),
                                env: None,
                                exited: false,
                            },
                        );
                        j.dirty = true;
                    }
                }
                EVENT_EXIT => {
                    for j in self.jobs.values_mut() {
                        if let Some(p) = j.procs.get_mut(&e.tgid)
                            && !p.exited
                        {
                            p.exited = true;
                            j.dirty = true;
                        }
                    }
                }
                _ => {}
            }
        }
        let Some(procs) = procs else {
            return Vec::new();
        };
        for (pid, info) in procs {
            let known = self
                .jobs
                .iter()
                .find(|(_, j)| j.procs.contains_key(pid))
                .map(|(id, _)| *id);
            if let Some(id) = known {
                let j = self.jobs.get_mut(&id).expect("job exists");
                let p = j.procs.get_mut(pid).expect("process exists");
                if p.start_ns != 0 && info.start_ns != 0 && p.start_ns != info.start_ns {
                    // The PID was reused by a new process: a new entry.
                    *p = ProcEntry {
                        parent: info.parent_tgid,
                        comm: procfs::stat(*pid).map(|s| s.comm).unwrap_or_default(),
                        start_ns: info.start_ns,
                        value: info.tracked,
                        env: None,
                        exited: info.exited != 0,
                    };
                    j.dirty = true;
                } else {
                    if p.start_ns == 0 {
                        p.start_ns = info.start_ns;
                    }
                    if info.exited != 0 && !p.exited {
                        p.exited = true;
                        j.dirty = true;
                    }
                }
                continue;
            }
            let Some(job) = self.job_of_value(info.tracked) else {
                continue;
            };
            let j = self.jobs.get_mut(&job).expect("job exists");
            j.procs.insert(
                *pid,
                ProcEntry {
                    parent: info.parent_tgid,
                    comm: procfs::stat(*pid).map(|s| s.comm).unwrap_or_default(),
                    start_ns: info.start_ns,
                    value: info.tracked,
                    env: None,
                    exited: info.exited != 0,
                },
            );
            j.dirty = true;
        }
        // Processes that vanished without the kernel telling (tracked by user space after
        // they had exited, e.g. a GPU holder adopted as it ended): check the live ones
        // against /proc.
        let mut vanished = Vec::new();
        for j in self.jobs.values_mut() {
            for p in j.procs.iter_mut().filter(|(_, p)| !p.exited) {
                if !procfs::alive(*p.0) {
                    p.1.exited = true;
                    j.dirty = true;
                    vanished.push(*p.0);
                }
            }
        }
        vanished
    }

    /// Re-examines changed jobs (all with `all`): roles, feeders, slots; tells the kernel.
    pub fn reassign(
        &mut self,
        kernel: &mut Kernel,
        gpu_holders: &[(u32, u32)],
        all: bool,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        let ids: Vec<u32> = self.jobs.keys().copied().collect();
        for id in ids {
            let holders: Vec<(u32, u32)> = {
                let j = &self.jobs[&id];
                gpu_holders
                    .iter()
                    .filter(|(_, pid)| j.procs.get(pid).is_some_and(|p| !p.exited))
                    .copied()
                    .collect()
            };
            let j = self.jobs.get_mut(&id).expect("job exists");
            if !(all || j.dirty || !holders.is_empty()) || j.ended.is_some() {
                continue;
            }
            j.dirty = false;
            if j.procs.values().all(|p| p.exited) {
                j.ended = Some(Instant::now());
                changes.push(Change::Ended(id));
                continue;
            }
            changes.extend(self.reassign_job(kernel, id, &holders));
        }
        changes
    }

    fn reassign_job(
        &mut self,
        kernel: &mut Kernel,
        id: u32,
        holders: &[(u32, u32)],
    ) -> Vec<Change> {
        let pinned_tid = self.config.feeder_tid;
        let j = self.jobs.get_mut(&id).expect("job exists");
        // The view of the live processes.
        let mut child_count: HashMap<u32, usize> = HashMap::new();
        for p in j.procs.values().filter(|p| !p.exited) {
            *child_count.entry(p.parent).or_default() += 1;
        }
        let mut views = BTreeMap::new();
        for (&pid, p) in j.procs.iter_mut().filter(|(_, p)| !p.exited) {
            if p.env.is_none() {
                p.env = Some(
                    procfs::environ(pid)
                        .map(|raw| identity::env_facts(&raw))
                        .unwrap_or_default(),
                );
            }
            let child_wait = child_count.get(&pid) == Some(&1)
                && procfs::blocked_syscall(pid).is_some_and(abi::is_child_wait);
            views.insert(
                pid,
                ProcView {
                    parent: p.parent,
                    comm: p.comm.clone(),
                    rank: p.env.as_ref().and_then(|e| e.rank.clone()),
                    child_wait,
                },
            );
        }
        let pinned = pinned_tid.and_then(|tid| {
            let tgid = procfs::tgid_of(tid)?;
            j.procs.contains_key(&tgid).then_some(tgid)
        });
        let a = roles::assign(&Inputs {
            root: j.root,
            procs: &views,
            gpu_holders: holders,
            pinned,
            ranked: j.ranked,
        });
        if a.feeders.iter().any(|f| !f.fallback) {
            j.ranked = true;
        }

        let mut changes = Vec::new();
        // Slots for new ranks.
        for f in &a.feeders {
            if j.ranks.contains_key(&f.rank) {
                continue;
            }
            let Some(slot) = self.free_slots.pop_first() else {
                if self.warned_no_slot.insert((id, f.rank.clone())) {
                    tracing::warn!(
                        job = %j.labels.job_name,
                        rank = %f.rank,
                        "no rank slot left (--max-ranks {}): this rank's processes are followed but not accounted",
                        self.config.max_slots
                    );
                    changes.push(Change::NoSlot {
                        job: id,
                        rank: f.rank.clone(),
                    });
                }
                continue;
            };
            self.slot_job.insert(slot, id);
            j.ranks.insert(
                f.rank.clone(),
                RankEntry {
                    slot,
                    rank: f.rank.clone(),
                    local_rank: f.local_rank,
                    feeder: None,
                    history: Vec::new(),
                },
            );
        }
        // A rank's environment names a job that nothing else named.
        if j.name_open
            && let Some(env) = a
                .feeders
                .iter()
                .filter_map(|f| j.procs.get(&f.pid)?.env.as_ref())
                .find(|e| e.elastic_run_id.is_some() || e.slurm_job_id.is_some())
        {
            if let Some(run) = &env.elastic_run_id {
                j.labels.job_name = run.clone();
            }
            if j.labels.hpc_job.is_empty()
                && let Some(id) = &env.slurm_job_id
            {
                j.labels.hpc_job = id.clone();
            }
            j.name_open = false;
            changes.push(Change::Relabeled(id));
        }
        // Feeders.
        let chosen: BTreeMap<&str, &roles::FeederChoice> =
            a.feeders.iter().map(|f| (f.rank.as_str(), f)).collect();
        for r in j.ranks.values_mut() {
            let Some(f) = chosen.get(r.rank.as_str()) else {
                r.feeder = None;
                continue;
            };
            let tid = pinned_tid
                .filter(|_| pinned == Some(f.pid))
                .unwrap_or(f.pid);
            let info = FeederInfo {
                pid: f.pid,
                tid,
                comm: procfs::stat(f.pid)
                    .map(|s| s.comm)
                    .or_else(|| views.get(&f.pid).map(|v| v.comm.clone()))
                    .unwrap_or_default(),
                gpus: f.gpus.clone(),
                why: f.why.clone(),
            };
            let same = r.feeder.as_ref().is_some_and(|old| {
                old.pid == info.pid && old.tid == info.tid && old.gpus == info.gpus
            });
            if !same {
                let main = if tid == f.pid { 0 } else { tid };
                if let Err(e) = kernel.set_feeder_tid(r.slot, main) {
                    tracing::warn!("setting the feeder of slot {}: {e}", r.slot);
                }
                r.local_rank = f.local_rank.or(r.local_rank);
                r.history.push(info.clone());
                r.feeder = Some(info);
                changes.push(Change::Feeder {
                    job: id,
                    rank: r.rank.clone(),
                    slot: r.slot,
                });
            }
        }
        // Roles into the kernel.
        for (pid, role) in &a.roles {
            let value = match role {
                Role::Feeder(r) | Role::Worker(r) => match j.ranks.get(r) {
                    Some(e) => tracked_value(
                        e.slot,
                        if matches!(role, Role::Feeder(_)) {
                            ROLE_FEEDER
                        } else {
                            ROLE_WORKER
                        },
                    ),
                    None => tracked_value(id, ROLE_LAUNCHER),
                },
                Role::Launcher => tracked_value(id, ROLE_LAUNCHER),
            };
            if let Some(p) = j.procs.get_mut(pid)
                && p.value != value
            {
                match kernel.retag(*pid, value) {
                    Ok(()) => p.value = value,
                    Err(e) => tracing::warn!("PID {pid}: {e}"),
                }
            }
        }
        changes
    }

    /// Drops jobs that ended more than `forget_after` ago: their slots are freed and their
    /// processes forgotten by the kernel.
    pub fn forget_ended(&mut self, kernel: &mut Kernel, now: Instant) -> Vec<Change> {
        let due: Vec<u32> = self
            .jobs
            .values()
            .filter(|j| {
                j.ended
                    .is_some_and(|t| now.duration_since(t) >= self.config.forget_after)
            })
            .map(|j| j.id)
            .collect();
        let mut changes = Vec::new();
        for id in due {
            let j = self.jobs.remove(&id).expect("job exists");
            for r in j.ranks.values() {
                self.slot_job.remove(&r.slot);
                self.free_slots.insert(r.slot);
                let _ = kernel.set_feeder_tid(r.slot, 0);
            }
            for (&pid, p) in &j.procs {
                if !p.exited {
                    kernel.untrack(pid);
                }
            }
            self.warned_no_slot.retain(|(job, _)| *job != id);
            changes.push(Change::Forgotten(id));
        }
        changes
    }

    /// Processes the kernel may forget (exited, final counters read), with their start times.
    pub fn prune_exited(&mut self, keep: usize) {
        for j in self.jobs.values_mut() {
            let exited: Vec<u32> = j
                .procs
                .iter()
                .filter(|(_, p)| p.exited)
                .map(|(pid, _)| *pid)
                .collect();
            // Exited processes are kept only as far as the summary shows them.
            if exited.len() > keep {
                for pid in &exited[..exited.len() - keep] {
                    j.procs.remove(pid);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launcher_job(jobs: &mut Jobs, id: u32, root: u32) {
        let entry = ProcEntry {
            parent: 1,
            comm: "bash".into(),
            start_ns: 0,
            value: tracked_value(id, ROLE_LAUNCHER),
            env: None,
            exited: false,
        };
        jobs.jobs.insert(
            id,
            Job {
                id,
                labels: JobLabels::default(),
                root,
                command: vec!["bash".into()],
                key: None,
                procs: BTreeMap::from([(root, entry)]),
                ranks: BTreeMap::new(),
                ended: None,
                name_open: true,
                ranked: false,
                dirty: false,
            },
        );
    }

    fn event(kind: u32, tgid: u32, tid: u32) -> Event {
        Event {
            kind,
            tgid,
            tid,
            ..Event::default()
        }
    }

    /// A launcher's fork is followed at the fine tick that brings its event: the child joins
    /// its parent's job (and the next pass gives it a role), before any full pass.
    #[test]
    fn a_launchers_fork_joins_its_job_at_once() {
        let mut jobs = Jobs::new(DiscoverConfig {
            max_slots: 4,
            feeder_tid: None,
            forget_after: Duration::from_secs(1),
        });
        launcher_job(&mut jobs, 1, 4_000_000);
        assert!(
            jobs.observe(&[event(EVENT_FORK, 4_000_001, 4_000_000)], None)
                .is_empty()
        );
        assert_eq!(jobs.job_of(4_000_001), Some(1));
        let j = jobs.get(1).unwrap();
        assert!(j.dirty);
        assert_eq!(j.procs[&4_000_001].parent, 4_000_000);
        assert_eq!(j.procs[&4_000_001].value, tracked_value(1, ROLE_LAUNCHER));
        // A fork by a process of no job is not followed.
        let _ = jobs.observe(&[event(EVENT_FORK, 4_000_003, 4_000_002)], None);
        assert_eq!(jobs.job_of(4_000_003), None);
    }
}
