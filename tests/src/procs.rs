//! Process trees and clocks, for tests and the benchmark: every process a test starts is
//! killed with its descendants when its guard is dropped.
use std::{
    collections::{HashMap, HashSet},
    process::Child,
};

/// Kills a child process (and its descendants) when dropped: workloads must never outlive a
/// failed test.
pub struct Reaper(pub Child);

impl Reaper {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        // Only while it has not been reaped: after that its PID may belong to someone else.
        if let Ok(None) = self.0.try_wait() {
            kill_tree(self.0.id());
            let _ = self.0.wait();
        }
    }
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Every live descendant of `root` (not `root` itself), parents first.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = parent_of(pid) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = Vec::new();
    let mut seen = HashSet::from([root]);
    let mut queue = vec![root];
    while let Some(p) = queue.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            if seen.insert(c) {
                out.push(c);
                queue.push(c);
            }
        }
    }
    out
}

/// SIGKILL to `root` and every descendant.
pub fn kill_tree(root: u32) {
    let mut all = descendants(root);
    all.push(root);
    for p in all {
        // SAFETY: signalling processes this test or benchmark started.
        unsafe { libc::kill(p as i32, libc::SIGKILL) };
    }
}

/// CLOCK_MONOTONIC in ns (the clock of the kernel's and the workloads' timestamps).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer, valid clock id.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether `pid` is alive (exists and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}
