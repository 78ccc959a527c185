//! Reading `/proc`: process status, parents and children, the few environment facts stallmon
//! uses, cgroups, the syscall a process sleeps in, per-task I/O accounting, open files. Every
//! read is bounded (a job controls its environment, command line and file names) and every
//! failure is `None`: processes come and go while we look.
use std::{
    collections::HashMap,
    io::Read,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::schema::record::TaskIo;

/// Largest environment read (bytes); a larger one is read up to this much.
const MAX_ENVIRON: u64 = 1 << 20;
const MAX_SMALL: u64 = 64 << 10;

/// The procfs root: `/proc`, or `$STALLMON_PROC_ROOT` in tests of the discovery rules.
pub fn root() -> PathBuf {
    std::env::var_os("STALLMON_PROC_ROOT")
        .map(Into::into)
        .unwrap_or_else(|| "/proc".into())
}

fn read_bounded(path: &Path, max: u64) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(max)
        .read_to_end(&mut buf)
        .ok()?;
    Some(buf)
}

fn read_text(pid: u32, file: &str, max: u64) -> Option<String> {
    let raw = read_bounded(&root().join(pid.to_string()).join(file), max)?;
    Some(String::from_utf8_lossy(&raw).into_owned())
}

/// Fields of `/proc/PID/stat`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    pub pid: u32,
    pub comm: String,
    pub state: char,
    pub ppid: u32,
    pub session: u32,
    pub flags: u64,
    /// Start time in clock ticks since boot.
    pub starttime: u64,
}

impl Stat {
    /// Kernel threads (`PF_KTHREAD`) have no user space to trace.
    pub fn is_kernel_thread(&self) -> bool {
        self.flags & 0x0020_0000 != 0
    }

    pub fn is_gone(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// Parses `/proc/PID/stat` (the command name may contain spaces and parentheses).
pub fn parse_stat(pid: u32, text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(") ")?;
    let comm = text.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = text.get(close + 2..)?.split_whitespace().collect();
    Some(Stat {
        pid,
        comm: crate::discover::identity::sanitize(&comm),
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        session: rest.get(3)?.parse().ok()?,
        flags: rest.get(6)?.parse().ok()?,
        starttime: rest.get(19)?.parse().ok()?,
    })
}

pub fn stat(pid: u32) -> Option<Stat> {
    parse_stat(pid, &read_text(pid, "stat", 4096)?)
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|s| !s.is_gone())
}

/// The user id owning `pid` (its real uid).
pub fn uid(pid: u32) -> Option<u32> {
    let status = read_text(pid, "status", MAX_SMALL)?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The process (thread group) a thread id belongs to.
pub fn tgid_of(tid: u32) -> Option<u32> {
    let status = read_text(tid, "status", MAX_SMALL)?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

/// Every process id in `/proc`.
pub fn pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(root()) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// The whole process table: `pid -> stat`.
pub fn all() -> HashMap<u32, Stat> {
    pids()
        .into_iter()
        .filter_map(|p| Some((p, stat(p)?)))
        .collect()
}

/// Every live descendant of `root` (not `root` itself), as (pid, parent) pairs, parents first.
pub fn descendants_in(table: &HashMap<u32, Stat>, root: u32) -> Vec<(u32, u32)> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for s in table.values() {
        if !s.is_gone() {
            children.entry(s.ppid).or_default().push(s.pid);
        }
    }
    for v in children.values_mut() {
        v.sort_unstable();
    }
    let mut out = Vec::new();
    let mut queue = std::collections::VecDeque::from([root]);
    while let Some(p) = queue.pop_front() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            if c != root {
                out.push((c, p));
                queue.push_back(c);
            }
        }
    }
    out
}

/// The raw environment of `pid` (bounded). Callers extract what they need with
/// `identity::env_facts` and drop the rest.
pub fn environ(pid: u32) -> Option<Vec<u8>> {
    read_bounded(&root().join(pid.to_string()).join("environ"), MAX_ENVIRON)
}

pub fn cgroup(pid: u32) -> Option<String> {
    read_text(pid, "cgroup", MAX_SMALL)
}

/// The command line, arguments joined by spaces (bounded, for `--match`).
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = read_bounded(&root().join(pid.to_string()).join("cmdline"), MAX_SMALL)?;
    let parts: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    Some(parts.join(" "))
}

/// The syscall the main thread of `pid` sleeps in (`/proc/PID/syscall`), if it sleeps in one.
pub fn blocked_syscall(pid: u32) -> Option<u64> {
    let text = read_text(pid, "syscall", 512)?;
    let first = text.split_whitespace().next()?;
    first.parse().ok() // "running" and "-1" (not in a syscall) do not parse as u64
}

fn parse_io(text: &str) -> Option<TaskIo> {
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?
            .trim()
            .parse()
            .ok()
    };
    Some(TaskIo {
        syscr: field("syscr")?,
        rchar: field("rchar")?,
        read_bytes: field("read_bytes").unwrap_or(0),
    })
}

/// The per-task I/O accounting of `pid`'s live threads, added up (`/proc/PID/task/TID/io`:
/// read-family calls, characters they returned, bytes fetched from storage). Unlike
/// `/proc/PID/io` it leaves out the children the process reaped, which are processes of their
/// own. `max_threads` bounds the work.
pub fn threads_io(pid: u32, max_threads: usize) -> Option<TaskIo> {
    let dir = std::fs::read_dir(root().join(pid.to_string()).join("task")).ok()?;
    let mut total = TaskIo::default();
    for t in dir.flatten().take(max_threads) {
        if let Some(b) = read_bounded(&t.path().join("io"), 4096)
            && let Some(io) = parse_io(&String::from_utf8_lossy(&b))
        {
            total.add(&io);
        }
    }
    Some(total)
}

/// Regular files `pid` has open read-only (the dataset, not logs or checkpoints), with the
/// device they live on. At most `limit` fds are looked at.
pub fn open_read_files(pid: u32, limit: usize) -> Vec<(PathBuf, u64)> {
    let base = root().join(pid.to_string());
    let Ok(dir) = std::fs::read_dir(base.join("fd")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for fd in dir.flatten().take(limit) {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        if !t.starts_with('/')
            || ["/dev/", "/proc/", "/sys/", "/usr/lib", "/lib"]
                .iter()
                .any(|p| t.starts_with(p))
        {
            continue;
        }
        // The access mode in fdinfo's octal flags is O_RDONLY (0).
        let info = read_bounded(&base.join("fdinfo").join(fd.file_name()), 4096)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let read_only = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .is_some_and(|f| f & 3 == 0);
        if !read_only {
            continue;
        }
        // stat through the fd link: the file as the process sees it (its mount namespace).
        let Ok(meta) = std::fs::metadata(fd.path()) else {
            continue;
        };
        if meta.is_file() {
            out.push((target, meta.dev()));
        }
    }
    out
}

/// The whole-disk name (`vda`, `nvme0n1`) of a file's device number, if it is a block device.
pub fn disk_of_dev(dev: u64) -> Option<String> {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    let disk = if sys.join("partition").exists() {
        sys.parent()?.to_path_buf()
    } else {
        sys
    };
    Some(disk.file_name()?.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_names() {
        let s = parse_stat(
            42,
            "42 (a) b (c) d) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 12345 1000 10",
        )
        .unwrap();
        assert_eq!(s.comm, "a) b (c) d");
        assert_eq!(
            (s.state, s.ppid, s.session, s.starttime),
            ('S', 1, 42, 12345)
        );
        assert!(!s.is_kernel_thread());
        let k = parse_stat(
            2,
            "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0",
        )
        .unwrap();
        assert!(k.is_kernel_thread());
        assert!(parse_stat(1, "garbage").is_none());
        // A newline in a command name is sanitized.
        let s = parse_stat(7, "7 (x\ny) S 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 9 0 0").unwrap();
        assert_eq!(s.comm, "x_y");
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        let s = stat(me).unwrap();
        assert_eq!(s.pid, me);
        assert!(alive(me));
        assert!(threads_io(me, 64).is_some_and(|io| io.rchar > 0));
        assert!(environ(me).is_some());
        assert!(cmdline(me).is_some());
        assert!(!alive(u32::MAX - 1));
    }

    #[test]
    fn finds_descendants_parents_first() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 5 & wait"])
            .spawn()
            .unwrap();
        let me = std::process::id();
        let mut found = Vec::new();
        for _ in 0..100 {
            found = descendants_in(&all(), me);
            if found.len() >= 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = std::process::Command::new("pkill")
            .args(["-P", &child.id().to_string()])
            .status();
        child.kill().ok();
        child.wait().ok();
        let sh = found.iter().position(|&(p, _)| p == child.id()).unwrap();
        let sleep = found
            .iter()
            .position(|&(_, parent)| parent == child.id())
            .unwrap();
        assert!(sh < sleep, "{found:?}");
    }
}
