//! `stallmon node`: finding the jobs on a host. A job starts when one of its processes holds a
//! GPU context (NVML) or its command line matches `--match`; its processes are grouped by what
//! they say about themselves (Kubernetes pod and container, SLURM job, elastic run id), else by
//! their process tree.
use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use regex::Regex;

use super::{
    Jobs,
    identity::{self, JobKey, PodRef},
    procfs::{self, Stat},
};
use crate::kernel::{Kernel, KernelError};

/// Longest walk up a process tree.
const MAX_DEPTH: usize = 64;

/// Finds new jobs.
pub struct NodeDiscovery {
    matchers: Vec<Regex>,
    scan_every: Duration,
    last_scan: Option<Instant>,
    /// stallmon itself and its ancestors: never part of a job.
    own: HashSet<u32>,
    /// Processes already checked against `--match` (pid, start ticks).
    checked: HashSet<(u32, u64)>,
}

/// What identifies a candidate process's job.
struct Candidate {
    root: u32,
    key: Option<JobKey>,
}

impl NodeDiscovery {
    pub fn new(matchers: Vec<Regex>, scan_every: Duration) -> Self {
        let mut own = HashSet::new();
        let mut pid = std::process::id();
        for _ in 0..MAX_DEPTH {
            own.insert(pid);
            match procfs::stat(pid) {
                Some(s) if s.ppid > 1 => pid = s.ppid,
                _ => break,
            }
        }
        Self {
            matchers,
            scan_every,
            last_scan: None,
            own,
            checked: HashSet::new(),
        }
    }

    /// Adds a job for every GPU context holder and `--match` process not yet in a job. `pod` maps a
    /// GPU index to the pod the kubelet gave it, when known. Returns the new jobs.
    pub fn discover(
        &mut self,
        jobs: &mut Jobs,
        kernel: &mut Kernel,
        holders: &[(u32, u32)],
        pod: &dyn Fn(u32) -> Option<PodRef>,
        now: Instant,
    ) -> Result<Vec<u32>, KernelError> {
        let mut pids: Vec<(u32, Option<u32>)> = holders
            .iter()
            .filter(|(_, pid)| jobs.job_of(*pid).is_none())
            .map(|&(gpu, pid)| (pid, Some(gpu)))
            .collect();
        let scan_due = self
            .last_scan
            .is_none_or(|t| now.duration_since(t) >= self.scan_every);
        let mut table: Option<HashMap<u32, Stat>> = None;
        if !self.matchers.is_empty() && scan_due {
            self.last_scan = Some(now);
            let t = procfs::all();
            self.checked
                .retain(|(pid, start)| t.get(pid).is_some_and(|s| s.starttime == *start));
            for s in t.values() {
                if s.is_kernel_thread()
                    || s.is_gone()
                    || self.own.contains(&s.pid)
                    || !self.checked.insert((s.pid, s.starttime))
                    || jobs.job_of(s.pid).is_some()
                {
                    continue;
                }
                if let Some(cmd) = procfs::cmdline(s.pid)
                    && self.matchers.iter().any(|m| m.is_match(&cmd))
                {
                    pids.push((s.pid, None));
                }
            }
            table = Some(t);
        }
        if pids.is_empty() {
            return Ok(Vec::new());
        }
        let table = table.unwrap_or_else(procfs::all);
        let mut new_jobs = Vec::new();
        for (pid, gpu) in pids {
            if jobs.job_of(pid).is_some() || self.own.contains(&pid) {
                continue;
            }
            let Some(c) = self.candidate(&table, pid) else {
                continue;
            };
            let existing = c.key.as_ref().and_then(|k| {
                jobs.iter()
                    .find(|j| j.ended.is_none() && j.key.as_ref() == Some(k))
                    .map(|j| j.id)
            });
            match existing {
                Some(job) => jobs.adopt(kernel, job, c.root)?,
                None => {
                    let root = &table[&c.root];
                    let env = procfs::environ(c.root)
                        .map(|raw| identity::env_facts(&raw))
                        .unwrap_or_default();
                    let cg = procfs::cgroup(c.root)
                        .map(|t| identity::cgroup_facts(&t))
                        .unwrap_or_default();
                    let pod_ref = gpu.and_then(pod);
                    let labels =
                        identity::job_labels(None, &env, &cg, pod_ref.as_ref(), &root.comm);
                    let command = procfs::cmdline(c.root)
                        .map(|c| vec![identity::sanitize(&c)])
                        .unwrap_or_default();
                    let name_open = env.elastic_run_id.is_none();
                    let id = jobs.add_job(kernel, c.root, labels, command, c.key.clone())?;
                    if name_open {
                        jobs.open_name(id);
                    }
                    tracing::info!(job = %jobs.get(id).map(|j| j.labels.job_name.clone()).unwrap_or_default(), root = c.root, "found a job");
                    new_jobs.push(id);
                }
            }
        }
        Ok(new_jobs)
    }

    /// The root of `pid`'s job: the topmost ancestor with the same identity (same pod and
    /// container, SLURM job or elastic run) and owner; without an identity, the topmost ancestor
    /// in the same session. Never init, never stallmon or its ancestors.
    fn candidate(&self, table: &HashMap<u32, Stat>, pid: u32) -> Option<Candidate> {
        let facts = |p: u32| {
            let env = procfs::environ(p)
                .map(|raw| identity::env_facts(&raw))
                .unwrap_or_default();
            let cg = procfs::cgroup(p)
                .map(|t| identity::cgroup_facts(&t))
                .unwrap_or_default();
            identity::job_key(&env, &cg)
        };
        // A process that is exiting (NVML may still list its context for a moment) is not a
        // new job.
        let me = table
            .get(&pid)
            .filter(|s| !s.is_gone() && !s.is_kernel_thread())?;
        let key = facts(pid);
        let uid = procfs::uid(pid);
        let mut root = me;
        for _ in 0..MAX_DEPTH {
            let Some(parent) = table.get(&root.ppid) else {
                break;
            };
            if parent.pid <= 1
                || self.own.contains(&parent.pid)
                || parent.is_kernel_thread()
                || procfs::uid(parent.pid) != uid
            {
                break;
            }
            let same = match &key {
                Some(k) => facts(parent.pid).as_ref() == Some(k),
                None => parent.session == me.session,
            };
            if !same {
                break;
            }
            root = parent;
        }
        let key = key.or(Some(JobKey::Root(root.pid, root.starttime)));
        Some(Candidate {
            root: root.pid,
            key,
        })
    }
}
