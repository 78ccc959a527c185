//! The job: the target process, its existing descendants at attach time, and starting a command
//! under the tracer without missing its first forks.
use std::{
    collections::{HashMap, HashSet},
    ffi::OsString,
    io::Write,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::PathBuf,
    process::{Child, Command},
};

use anyhow::{Context, Result, anyhow, bail};

/// The hidden subcommand of the trampoline (see [`spawn_gated`]).
pub const GATE_SUBCOMMAND: &str = "__exec-after-gate";

/// Checks that `pid` names a live user-space process.
pub fn check_pid(pid: u32) -> Result<()> {
    if pid == 0 {
        bail!("invalid PID 0");
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|_| anyhow!("no such process: PID {pid} does not exist"))?;
    let (_, rest) = stat
        .rsplit_once(") ")
        .ok_or_else(|| anyhow!("cannot parse /proc/{pid}/stat"))?;
    if rest.starts_with('Z') || rest.starts_with('X') {
        bail!("PID {pid} has already exited (zombie)");
    }
    // Kernel threads have no memory map.
    let flags: u64 = rest
        .split_whitespace()
        .nth(6)
        .and_then(|f| f.parse().ok())
        .unwrap_or(0);
    if flags & 0x0020_0000 != 0 {
        bail!("PID {pid} is a kernel thread, not a training job");
    }
    Ok(())
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Every live descendant of `root` (not `root` itself), as (pid, parent) pairs, parents first.
pub fn descendants(root: u32) -> Vec<(u32, u32)> {
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
                out.push((c, p));
                queue.push(c);
            }
        }
    }
    out
}

/// A command started under the tracer. It is held before `exec` until [`Gated::release`], so
/// that it is tracked before it can fork anything.
pub struct Gated {
    pub child: Child,
    gate: Option<std::fs::File>,
}

impl Gated {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets the command run.
    pub fn release(&mut self) -> Result<()> {
        if let Some(mut g) = self.gate.take() {
            g.write_all(b"g").context("releasing the command")?;
        }
        Ok(())
    }
}

/// Resolves `program` like `execvp` does, so that a bad command fails before tracing starts.
pub fn resolve_program(program: &OsString) -> Result<PathBuf> {
    which::which(program)
        .map_err(|e| anyhow!("cannot start command {:?}: {e}", program.to_string_lossy()))
}

/// Starts `argv` through a trampoline: this same binary, which waits on a pipe and then execs the
/// command in place (same PID). std's `spawn` returns once the trampoline is running; the caller
/// tracks the PID and calls [`Gated::release`].
pub fn spawn_gated(argv: &[OsString]) -> Result<Gated> {
    let program = argv.first().ok_or_else(|| anyhow!("no command given"))?;
    let resolved = resolve_program(program)?;
    let mut fds = [0; 2];
    // SAFETY: valid array; O_CLOEXEC keeps the write end out of the command.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: fresh fds owned by us.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let read_fd = read_end.as_raw_fd();
    let exe = std::env::current_exe().context("locating the stallmon binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg(GATE_SUBCOMMAND)
        .arg(read_fd.to_string())
        .arg(&resolved)
        .args(&argv[1..]);
    // SAFETY: only async-signal-safe calls (fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Let the read end survive exec into the trampoline.
            if libc::fcntl(read_fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting the command")?;
    drop(read_end);
    Ok(Gated {
        child,
        gate: Some(std::fs::File::from(write_end)),
    })
}

/// The trampoline: wait for the gate byte (or EOF if the tracer died), then exec the command.
/// Only returns on failure.
pub fn exec_after_gate(args: &[OsString]) -> anyhow::Error {
    let Some(fd) = args
        .first()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse::<i32>().ok())
    else {
        return anyhow!("{GATE_SUBCOMMAND}: bad arguments");
    };
    let mut b = [0u8; 1];
    // SAFETY: reading one byte into a valid buffer from an inherited fd.
    unsafe {
        libc::read(fd, b.as_mut_ptr().cast(), 1);
        libc::close(fd);
    }
    if b[0] != b'g' {
        return anyhow!("tracer went away before the command was released");
    }
    let Some(program) = args.get(1) else {
        return anyhow!("{GATE_SUBCOMMAND}: no command");
    };
    let err = Command::new(program).args(&args[2..]).exec();
    anyhow!(
        "cannot start command {:?}: {err}",
        program.to_string_lossy()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_missing_and_kernel_pids() {
        assert!(check_pid(0).is_err());
        let e = check_pid(u32::MAX - 1).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        // kthreadd is PID 2 on Linux.
        if let Err(e) = check_pid(2) {
            assert!(e.to_string().contains("kernel thread"), "{e}");
        }
        check_pid(std::process::id()).unwrap();
    }

    #[test]
    fn finds_descendants() {
        let mut child = Command::new("sleep").arg("5").spawn().unwrap();
        let d = descendants(std::process::id());
        child.kill().ok();
        child.wait().ok();
        assert!(
            d.iter()
                .any(|&(p, parent)| p == child.id() && parent == std::process::id())
        );
    }

    #[test]
    fn unknown_command_is_a_clear_error() {
        let e = resolve_program(&OsString::from("no-such-command-xyz")).unwrap_err();
        assert!(e.to_string().contains("cannot start command"), "{e}");
    }
}
