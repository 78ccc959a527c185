//! The rules that find a job's feeders and give every process its role (pure functions over a
//! view of the job's process tree; see docs/method.md "Jobs, ranks and roles").
//!
//! 1. A process holding a compute context on a GPU (NVML's process lists) is that GPU's feeder
//!    (the topmost one, when a process and its descendants hold contexts on the same GPU).
//! 2. Before a context exists, or without NVML: the topmost process carrying each rank's
//!    variables (`RANK`, `SLURM_PROCID`, ...) is that rank's feeder; its DataLoader workers
//!    inherit the variables and stay workers. A feeder that merely waits for its only child (a
//!    shell running `python train.py; ...`) hands the role to that child.
//! 3. Without either, and only for a job that never had either: the nearest process at or below
//!    the job's root that is not merely waiting for its only child. (A job whose ranks have exited
//!    has no feeder: its launcher, still winding down, does not become one.)
//!
//! Workers are the descendants of a feeder; every other process of the job is a launcher.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::identity::RankVars;

/// What the rules need to know about one process of the job.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcView {
    pub parent: u32,
    pub comm: String,
    pub rank: Option<RankVars>,
    /// The process sleeps in a call that waits for a child or a signal (wait4, waitid,
    /// rt_sigsuspend, ...).
    pub child_wait: bool,
}

/// A feeder and the rank it feeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeederChoice {
    /// The rank label.
    pub rank: String,
    pub local_rank: Option<u32>,
    pub pid: u32,
    /// GPUs it holds contexts on.
    pub gpus: Vec<u32>,
    pub why: String,
    /// Chosen by rule 3 (no rank variables, no GPU context anywhere in the job).
    pub fallback: bool,
}

/// A process's role: feeder or worker of a rank (by label), or launcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    Feeder(String),
    Worker(String),
    Launcher,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    pub feeders: Vec<FeederChoice>,
    pub roles: BTreeMap<u32, Role>,
}

/// Inputs of [`assign`]: the job's live processes, its root, the GPU contexts its processes
/// hold `(gpu, pid)`, and a feeder fixed by the user (`--feeder-tid`'s process).
pub struct Inputs<'a> {
    pub root: u32,
    pub procs: &'a BTreeMap<u32, ProcView>,
    pub gpu_holders: &'a [(u32, u32)],
    pub pinned: Option<u32>,
    /// The job has had a feeder by rule 1 or 2: rule 3 no longer applies.
    pub ranked: bool,
}

const MAX_DEPTH: usize = 64;

struct Tree<'a> {
    procs: &'a BTreeMap<u32, ProcView>,
    children: HashMap<u32, Vec<u32>>,
}

impl<'a> Tree<'a> {
    fn new(procs: &'a BTreeMap<u32, ProcView>) -> Self {
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for (&pid, p) in procs {
            if procs.contains_key(&p.parent) && p.parent != pid {
                children.entry(p.parent).or_default().push(pid);
            }
        }
        Self { procs, children }
    }

    fn label(&self, pid: u32) -> Option<String> {
        self.procs.get(&pid)?.rank.as_ref()?.label()
    }

    fn ancestors(&self, pid: u32) -> impl Iterator<Item = u32> + '_ {
        let mut cur = pid;
        let mut depth = 0;
        std::iter::from_fn(move || {
            let parent = self.procs.get(&cur)?.parent;
            depth += 1;
            if depth > MAX_DEPTH || !self.procs.contains_key(&parent) || parent == cur {
                return None;
            }
            cur = parent;
            Some(parent)
        })
    }

    /// Follows `pid` down through processes that only wait for their only child; with
    /// `same_rank`, only into a child carrying the same rank label.
    fn through_wrappers(&self, mut pid: u32, same_rank: bool) -> (u32, usize) {
        let mut hops = 0;
        while hops < MAX_DEPTH {
            let Some(p) = self.procs.get(&pid) else { break };
            let kids = self.children.get(&pid).map(Vec::as_slice).unwrap_or(&[]);
            if !p.child_wait || kids.len() != 1 {
                break;
            }
            let child = kids[0];
            if same_rank && self.label(child) != self.label(pid) {
                break;
            }
            pid = child;
            hops += 1;
        }
        (pid, hops)
    }
}

fn wrapper_note(hops: usize, tree: &Tree, pid: u32) -> String {
    if hops == 0 {
        String::new()
    } else {
        let comm = tree.procs.get(&pid).map(|p| p.comm.as_str()).unwrap_or("?");
        format!(" (below {hops} wrapper(s) only waiting for it: {comm})")
    }
}

/// Chooses the feeders and gives every process its role.
pub fn assign(inp: &Inputs) -> Assignment {
    let tree = Tree::new(inp.procs);
    let mut feeders: BTreeMap<String, FeederChoice> = BTreeMap::new();
    let local = |pid: u32| tree.procs.get(&pid)?.rank.as_ref()?.local_rank;

    if let Some(pid) = inp.pinned.filter(|p| tree.procs.contains_key(p)) {
        let rank = tree.label(pid).unwrap_or_else(|| "0".into());
        feeders.insert(
            rank.clone(),
            FeederChoice {
                rank,
                local_rank: local(pid),
                pid,
                gpus: Vec::new(),
                why: "named with --feeder-tid".into(),
                fallback: false,
            },
        );
    } else {
        // Rule 2: topmost process per rank label, through same-rank wrappers.
        for &pid in inp.procs.keys() {
            let Some(label) = tree.label(pid) else {
                continue;
            };
            let parent_same = inp
                .procs
                .get(&pid)
                .and_then(|p| tree.label(p.parent))
                .is_some_and(|l| l == label);
            if parent_same || feeders.contains_key(&label) {
                continue;
            }
            let (feeder, hops) = tree.through_wrappers(pid, true);
            let source = tree.procs[&pid]
                .rank
                .as_ref()
                .map_or("RANK", |r: &RankVars| r.source);
            feeders.insert(
                label.clone(),
                FeederChoice {
                    rank: label.clone(),
                    local_rank: local(feeder),
                    pid: feeder,
                    gpus: Vec::new(),
                    why: format!(
                        "topmost process with {source}={label} in its environment{}",
                        wrapper_note(hops, &tree, pid)
                    ),
                    fallback: false,
                },
            );
        }

        // Rule 1: GPU context holders override, GPU by GPU.
        let mut by_gpu: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        for &(gpu, pid) in inp.gpu_holders {
            if inp.procs.contains_key(&pid) {
                by_gpu.entry(gpu).or_default().insert(pid);
            }
        }
        for (gpu, holders) in &by_gpu {
            let Some(&holder) = holders
                .iter()
                .find(|&&p| !tree.ancestors(p).any(|a| holders.contains(&a)))
            else {
                continue;
            };
            let why = format!("holds a compute context on GPU {gpu}");
            // Its rank: its own label, else the rank of the feeder it descends from, else the
            // rank it already feeds, else the next free number.
            let rank = tree
                .label(holder)
                .or_else(|| {
                    let up: Vec<u32> = std::iter::once(holder)
                        .chain(tree.ancestors(holder))
                        .collect();
                    feeders
                        .values()
                        .find(|f| up.contains(&f.pid))
                        .map(|f| f.rank.clone())
                })
                .unwrap_or_else(|| {
                    (0u32..)
                        .map(|i| i.to_string())
                        .find(|r| !feeders.contains_key(r))
                        .expect("a free number")
                });
            let f = feeders.entry(rank.clone()).or_insert_with(|| FeederChoice {
                rank: rank.clone(),
                local_rank: local(holder),
                pid: holder,
                gpus: Vec::new(),
                why: why.clone(),
                fallback: false,
            });
            if f.pid != holder && !f.why.starts_with("holds a compute context") {
                f.pid = holder;
                f.local_rank = local(holder).or(f.local_rank);
                f.gpus.clear();
                f.why = why;
            } else if f.pid == holder && !f.why.starts_with("holds a compute context") {
                f.why = why;
            }
            if f.pid == holder {
                f.gpus.push(*gpu);
            }
        }

        // Rule 3: no rank variables, no contexts, never had any.
        if feeders.is_empty() && !inp.ranked && inp.procs.contains_key(&inp.root) {
            let (pid, hops) = tree.through_wrappers(inp.root, false);
            feeders.insert(
                "0".into(),
                FeederChoice {
                    rank: "0".into(),
                    local_rank: local(pid),
                    pid,
                    gpus: Vec::new(),
                    why: if hops == 0 {
                        "the job's root process (no rank variables, no GPU context)".into()
                    } else {
                        format!(
                            "nearest process below the job's root that is not only waiting for its child{}",
                            wrapper_note(hops, &tree, inp.root)
                        )
                    },
                    fallback: true,
                },
            );
        }
    }

    // Roles: feeders; their descendants are workers of the nearest feeder above; the rest are
    // launchers.
    let feeder_rank: HashMap<u32, String> =
        feeders.values().map(|f| (f.pid, f.rank.clone())).collect();
    let roles = inp
        .procs
        .keys()
        .map(|&pid| {
            let role = if let Some(r) = feeder_rank.get(&pid) {
                Role::Feeder(r.clone())
            } else if let Some(r) = tree.ancestors(pid).find_map(|a| feeder_rank.get(&a)) {
                Role::Worker(r.clone())
            } else {
                Role::Launcher
            };
            (pid, role)
        })
        .collect();
    Assignment {
        feeders: feeders.into_values().collect(),
        roles,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(parent: u32, comm: &str) -> ProcView {
        ProcView {
            parent,
            comm: comm.into(),
            ..ProcView::default()
        }
    }

    fn ranked(parent: u32, comm: &str, rank: u32, local: u32) -> ProcView {
        ProcView {
            rank: Some(RankVars {
                rank: Some(rank),
                local_rank: Some(local),
                source: "RANK",
            }),
            ..p(parent, comm)
        }
    }

    fn waiting(mut v: ProcView) -> ProcView {
        v.child_wait = true;
        v
    }

    fn run(root: u32, procs: &[(u32, ProcView)], gpus: &[(u32, u32)]) -> Assignment {
        let procs: BTreeMap<u32, ProcView> = procs.iter().cloned().collect();
        assign(&Inputs {
            root,
            procs: &procs,
            gpu_holders: gpus,
            pinned: None,
            ranked: false,
        })
    }

    #[test]
    fn a_launcher_left_alone_by_its_ranks_does_not_feed() {
        // torchrun (10) whose rank processes have exited: no feeder once the job had ranks.
        let procs: BTreeMap<u32, ProcView> = [(10, p(1, "torchrun"))].into_iter().collect();
        let inputs = |ranked| Inputs {
            root: 10,
            procs: &procs,
            gpu_holders: &[],
            pinned: None,
            ranked,
        };
        assert!(assign(&inputs(true)).feeders.is_empty());
        assert_eq!(assign(&inputs(true)).roles[&10], Role::Launcher);
        // A job that never had ranks: its root feeds (a plain `python train.py`).
        let a = assign(&inputs(false));
        assert_eq!(feeders(&a), [("0".to_string(), 10)]);
        assert!(a.feeders[0].fallback);
    }

    fn feeders(a: &Assignment) -> Vec<(String, u32)> {
        a.feeders.iter().map(|f| (f.rank.clone(), f.pid)).collect()
    }

    #[test]
    fn single_process_job_with_workers() {
        let a = run(
            10,
            &[
                (10, p(1, "python")),
                (11, p(10, "python")),
                (12, p(10, "python")),
            ],
            &[],
        );
        assert_eq!(feeders(&a), [("0".to_string(), 10)]);
        assert_eq!(a.roles[&11], Role::Worker("0".into()));
    }

    #[test]
    fn shell_wrapper_hands_over_to_its_child() {
        // bash -c "python train.py; sleep 4": bash waits for python, python has 4 workers.
        let mut procs = vec![(10, waiting(p(1, "bash"))), (11, p(10, "python"))];
        procs.extend((12..16).map(|w| (w, p(11, "python"))));
        let a = run(10, &procs, &[]);
        assert_eq!(feeders(&a), [("0".to_string(), 11)]);
        assert!(a.feeders[0].why.contains("wrapper"), "{}", a.feeders[0].why);
        assert_eq!(a.roles[&10], Role::Launcher);
        assert_eq!(a.roles[&13], Role::Worker("0".into()));
        // timeout -> python: the same.
        let a = run(
            20,
            &[(20, waiting(p(1, "timeout"))), (21, p(20, "python"))],
            &[],
        );
        assert_eq!(feeders(&a), [("0".to_string(), 21)]);
        // A shell that is not waiting (it runs a loop) stays the feeder.
        let a = run(30, &[(30, p(1, "bash")), (31, p(30, "python"))], &[]);
        assert_eq!(feeders(&a), [("0".to_string(), 30)]);
    }

    #[test]
    fn torchrun_ranks_are_feeders_and_their_workers_stay_workers() {
        let mut procs = vec![(100, p(1, "torchrun"))];
        for r in 0..2u32 {
            let rank = 101 + r * 10;
            procs.push((rank, ranked(100, "python", r, r)));
            // DataLoader workers inherit RANK.
            procs.push((rank + 1, ranked(rank, "python", r, r)));
            procs.push((rank + 2, ranked(rank, "python", r, r)));
        }
        let a = run(100, &procs, &[]);
        assert_eq!(
            feeders(&a),
            [("0".to_string(), 101), ("1".to_string(), 111)]
        );
        assert_eq!(a.roles[&100], Role::Launcher);
        assert_eq!(a.roles[&112], Role::Worker("1".into()));
        assert!(a.feeders[1].why.contains("RANK=1"));
        assert_eq!(a.feeders[1].local_rank, Some(1));
    }

    #[test]
    fn srun_bash_wrapper_with_rank_variables() {
        // srun -> bash (SLURM_PROCID=0, waiting) -> python (SLURM_PROCID=0) -> worker.
        let mut bash = ranked(200, "bash", 0, 0);
        bash.child_wait = true;
        let procs = [
            (200, p(1, "srun")),
            (201, bash),
            (202, ranked(201, "python", 0, 0)),
            (203, ranked(202, "python", 0, 0)),
        ];
        let a = run(200, &procs, &[]);
        assert_eq!(feeders(&a), [("0".to_string(), 202)]);
        assert_eq!(a.roles[&201], Role::Launcher);
        assert_eq!(a.roles[&203], Role::Worker("0".into()));
    }

    #[test]
    fn gpu_contexts_decide() {
        // No rank variables; the process holding the context under a non-waiting launcher.
        let procs = [
            (300, p(1, "launcher")),
            (301, p(300, "python")),
            (302, p(301, "python")),
        ];
        let a = run(300, &procs, &[(0, 301)]);
        assert_eq!(feeders(&a), [("0".to_string(), 301)]);
        assert_eq!(a.feeders[0].gpus, [0]);
        assert_eq!(a.roles[&300], Role::Launcher);
        assert_eq!(a.roles[&302], Role::Worker("0".into()));
        // Two ranks with variables hold GPUs 1 and 0.
        let procs = [
            (400, p(1, "torchrun")),
            (401, ranked(400, "python", 0, 0)),
            (402, ranked(400, "python", 1, 1)),
        ];
        let a = run(400, &procs, &[(1, 402), (0, 401), (0, 999)]);
        assert_eq!(
            feeders(&a),
            [("0".to_string(), 401), ("1".to_string(), 402)]
        );
        assert_eq!(a.feeders[1].gpus, [1]);
        assert!(a.feeders[1].why.contains("GPU 1"));
        // A context held below an undetected wrapper moves the rank's feeder down.
        let procs = [
            (500, p(1, "torchrun")),
            (501, ranked(500, "sh", 0, 0)),
            (502, ranked(501, "python", 0, 0)),
        ];
        let a = run(500, &procs, &[(0, 502)]);
        assert_eq!(feeders(&a), [("0".to_string(), 502)]);
        assert_eq!(a.roles[&501], Role::Launcher);
        // A DataLoader worker that also holds a context on its feeder's GPU changes nothing.
        let procs = [(600, p(1, "python")), (601, p(600, "python"))];
        let a = run(600, &procs, &[(0, 600), (0, 601)]);
        assert_eq!(feeders(&a), [("0".to_string(), 600)]);
        assert_eq!(a.roles[&601], Role::Worker("0".into()));
    }

    #[test]
    fn pinned_feeder_wins() {
        let procs: BTreeMap<u32, ProcView> =
            [(10, p(1, "a")), (11, p(10, "b"))].into_iter().collect();
        let a = assign(&Inputs {
            root: 10,
            procs: &procs,
            gpu_holders: &[(0, 10)],
            pinned: Some(11),
            ranked: false,
        });
        assert_eq!(feeders(&a), [("0".to_string(), 11)]);
        assert_eq!(a.roles[&10], Role::Launcher);
    }

    #[test]
    fn cycles_and_missing_parents_terminate() {
        let procs = [(1, p(2, "a")), (2, p(1, "b")), (3, p(99, "c"))];
        let a = run(3, &procs, &[]);
        assert_eq!(feeders(&a), [("0".to_string(), 3)]);
        assert_eq!(a.roles[&1], Role::Launcher);
    }
}
