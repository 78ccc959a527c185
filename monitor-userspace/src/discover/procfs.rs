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

use monitor_common::{
    FD_FILE, FD_IPC, FD_OTHER, STATE_IPC_WAIT, STATE_ON_CPU, STATE_OTHER_WAIT, STATE_STORAGE_WAIT,
    abi,
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

/// What thread `tid` of `pid` is doing now, in `sched_switch`'s terms (`STATE_*`): read from
/// `/proc/PID/task/TID/{stat,syscall}` and, for a read, the link of the fd it reads. The kernel
/// tells user space of a feeder's state changes only; a thread that becomes a feeder while it
/// sleeps (found below a launcher, or by its GPU context) would otherwise be unknown (→ other)
/// until it wakes. `None` if the thread is gone or its files cannot be read.
pub fn thread_state(pid: u32, tid: u32) -> Option<u32> {
    let task = format!("task/{tid}/");
    let stat = parse_stat(tid, &read_text(pid, &format!("{task}stat"), 4096)?)?;
    let syscall = read_text(pid, &format!("{task}syscall"), 512)?;
    Some(classify_thread(stat.state, &syscall, |fd| fd_kind(pid, fd)))
}

/// The kind (`FD_*`) of `pid`'s descriptor `fd`, from its link text alone: the link is never
/// followed (a job's file can live on a FUSE mount that does not answer).
fn fd_kind(pid: u32, fd: u64) -> u32 {
    let path = root().join(pid.to_string()).join("fd").join(fd.to_string());
    match std::fs::read_link(path) {
        Ok(t) => fd_kind_of_link(&t.to_string_lossy()),
        Err(_) => FD_OTHER,
    }
}

/// `pipe:[N]` and `socket:[N]` are IPC; a path is a file, except character devices and the
/// like under `/dev` (a tmpfs file under `/dev/shm` is a file); `anon_inode:...` is other.
fn fd_kind_of_link(link: &str) -> u32 {
    if link.starts_with("pipe:") || link.starts_with("socket:") {
        FD_IPC
    } else if link.starts_with('/') && (!link.starts_with("/dev/") || link.starts_with("/dev/shm/"))
    {
        FD_FILE
    } else {
        FD_OTHER
    }
}

/// `sched_switch`'s classification (monitor-ebpf `probes/sched.rs`, `off_cpu`) from what
/// `/proc` shows: `state` from `stat`, the text of `syscall` (`running`, `-1 sp pc` outside a
/// syscall, or `NR arg1 ... arg6 sp pc`). An uninterruptible sleep ('D') stands for the
/// kernel's `in_iowait`, which `/proc` does not show.
pub fn classify_thread(state: char, syscall: &str, fd_kind: impl Fn(u64) -> u32) -> u32 {
    if state == 'R' {
        return STATE_ON_CPU;
    }
    let mut fields = syscall.split_whitespace();
    let first = fields.next().unwrap_or_default();
    let Ok(nr) = first.parse::<u64>() else {
        // `running`: it woke since `stat` was read; `-1`: asleep outside a syscall.
        return match (first, state) {
            ("running", _) => STATE_ON_CPU,
            (_, 'D') => STATE_STORAGE_WAIT,
            _ => STATE_OTHER_WAIT,
        };
    };
    let iowait = state == 'D';
    if abi::is_read_family(nr) {
        let fd = fields
            .next()
            .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok());
        return match fd.map(&fd_kind) {
            Some(FD_FILE) => STATE_STORAGE_WAIT,
            Some(FD_IPC) => STATE_IPC_WAIT,
            _ if iowait => STATE_STORAGE_WAIT,
            _ => STATE_OTHER_WAIT,
        };
    }
    if iowait {
        STATE_STORAGE_WAIT
    } else if abi::is_ipc_wait(nr) {
        STATE_IPC_WAIT
    } else {
        STATE_OTHER_WAIT
    }
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
    fn a_sleeping_thread_is_classified_as_sched_switch_would() {
        let kind = |fd: u64| match fd {
            3 => FD_FILE,
            4 => FD_IPC,
            _ => FD_OTHER,
        };
        let sp_pc = "0x7ffd5d1c8e10 0x7f0c1a2b3c4d";
        let read = |fd: u32| format!("0 {fd:#x} 0x55d0c0a0 0x40000 0x0 0x0 0x0 {sp_pc}");
        assert_eq!(classify_thread('S', &read(4), kind), STATE_IPC_WAIT);
        assert_eq!(classify_thread('D', &read(3), kind), STATE_STORAGE_WAIT);
        assert_eq!(classify_thread('S', &read(3), kind), STATE_STORAGE_WAIT);
        assert_eq!(classify_thread('S', &read(9), kind), STATE_OTHER_WAIT);
        assert_eq!(classify_thread('D', &read(9), kind), STATE_STORAGE_WAIT);
        // futex (202), poll (7): waiting for another thread or process.
        let futex = format!("202 0x7f00 0x80 0x0 0x0 0x0 0x0 {sp_pc}");
        assert_eq!(classify_thread('S', &futex, kind), STATE_IPC_WAIT);
        assert_eq!(
            classify_thread('S', &format!("7 0x1 0x1 0x0 0x0 0x0 0x0 {sp_pc}"), kind),
            STATE_IPC_WAIT
        );
        // nanosleep (35), wait4 (61): other.
        assert_eq!(
            classify_thread('S', &format!("35 0x0 0x0 0x0 0x0 0x0 0x0 {sp_pc}"), kind),
            STATE_OTHER_WAIT
        );
        assert_eq!(
            classify_thread('S', &format!("61 0x0 0x0 0x0 0x0 0x0 0x0 {sp_pc}"), kind),
            STATE_OTHER_WAIT
        );
        // Running, woken between the two reads, a page fault, garbage.
        assert_eq!(classify_thread('R', "running", kind), STATE_ON_CPU);
        assert_eq!(classify_thread('S', "running", kind), STATE_ON_CPU);
        assert_eq!(
            classify_thread('D', &format!("-1 {sp_pc}"), kind),
            STATE_STORAGE_WAIT
        );
        assert_eq!(
            classify_thread('S', &format!("-1 {sp_pc}"), kind),
            STATE_OTHER_WAIT
        );
        assert_eq!(classify_thread('S', "", kind), STATE_OTHER_WAIT);
        assert_eq!(classify_thread('S', "0 zz", kind), STATE_OTHER_WAIT);
    }

    #[test]
    fn fd_links_are_classified_by_their_text() {
        assert_eq!(fd_kind_of_link("pipe:[12345]"), FD_IPC);
        assert_eq!(fd_kind_of_link("socket:[9]"), FD_IPC);
        assert_eq!(fd_kind_of_link("/data/shard-0001.tar"), FD_FILE);
        assert_eq!(fd_kind_of_link("/data/gone (deleted)"), FD_FILE);
        assert_eq!(fd_kind_of_link("/dev/shm/torch_123"), FD_FILE);
        assert_eq!(fd_kind_of_link("/dev/pts/3"), FD_OTHER);
        assert_eq!(fd_kind_of_link("anon_inode:[eventfd]"), FD_OTHER);
    }

    /// This test's own thread, asleep in a pipe read, as a feeder found while it sleeps.
    #[test]
    fn a_thread_blocked_in_a_pipe_read_is_waiting_for_ipc() {
        let (mut r, w) = std::io::pipe().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            let mut b = [0u8; 1];
            r.read_exact(&mut b).unwrap();
        });
        let tid = rx.recv().unwrap();
        let pid = std::process::id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut seen = None;
        while std::time::Instant::now() < deadline {
            seen = thread_state(pid, tid);
            if seen == Some(STATE_IPC_WAIT) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        drop(w);
        let _ = reader.join();
        assert_eq!(seen, Some(STATE_IPC_WAIT));
        assert_eq!(thread_state(pid, u32::MAX), None);
    }

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
