//! The target of `stallmon trace`: checking a PID given with `--pid`, starting a command under
//! the tracer without missing its first forks, and stopping what we started.
use std::{
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

use crate::discover::procfs;

/// The open-files limit stallmon started with, before it raised its own (restored for the
/// command it starts).
pub static ORIGINAL_NOFILE: std::sync::OnceLock<(libc::rlim_t, libc::rlim_t)> =
    std::sync::OnceLock::new();

/// The hidden subcommand of the trampoline (see [`spawn_gated`]).
pub const GATE_SUBCOMMAND: &str = "__exec-after-gate";

/// Resolves `--pid` to a process that may be traced: it exists, is not a zombie or a kernel
/// thread, is neither init nor stallmon itself. A thread id is resolved to its process, and the
/// returned note says so.
pub fn check_pid(pid: u32) -> Result<(u32, Option<String>)> {
    if pid == 0 {
        bail!("invalid PID 0");
    }
    let tgid =
        procfs::tgid_of(pid).ok_or_else(|| anyhow!("no such process: PID {pid} does not exist"))?;
    let note = (tgid != pid)
        .then(|| format!("PID {pid} is a thread of process {tgid}: tracing process {tgid}"));
    let stat =
        procfs::stat(tgid).ok_or_else(|| anyhow!("no such process: PID {pid} does not exist"))?;
    if stat.is_gone() {
        bail!("PID {tgid} has already exited (zombie)");
    }
    if stat.is_kernel_thread() {
        bail!("PID {tgid} is a kernel thread, not a training job");
    }
    if tgid == 1 {
        bail!(
            "PID 1 is init: stallmon traces a training job, not the whole system (use `stallmon node` for every job on the host)"
        );
    }
    if tgid == std::process::id() {
        bail!("PID {tgid} is stallmon itself");
    }
    Ok((tgid, note))
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
    // Our own executable by its /proc link, which works even when the file was replaced or
    // removed since we started (a package upgrade): current_exe() would name a deleted path.
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(GATE_SUBCOMMAND)
        .arg(read_fd.to_string())
        .arg(&resolved)
        .args(&argv[1..])
        // systemd's notification channel is stallmon's, not the job's.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID");
    let nofile = ORIGINAL_NOFILE.get().copied();
    // SAFETY: only async-signal-safe calls (fcntl, setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((cur, max)) = nofile {
                let lim = libc::rlimit {
                    rlim_cur: cur,
                    rlim_max: max,
                };
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
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

/// A process's exit status as a shell reports it (128 + signal when killed).
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Stops the job we started: SIGTERM to the command and every other live process of its job
/// (DataLoader workers would otherwise be orphaned, still holding our stdout), SIGKILL to what
/// is left after 5 s. Returns the command's status.
pub fn stop_tree(child: &mut Child, job: &[u32]) -> i32 {
    if let Ok(Some(s)) = child.try_wait() {
        return exit_code(s);
    }
    let root = child.id();
    let mut pids: Vec<u32> = job.iter().copied().filter(|&p| p != root).collect();
    pids.insert(0, root);
    let signal_all = |sig| {
        for &p in &pids {
            // SAFETY: signalling processes of the job we started.
            unsafe { libc::kill(p as i32, sig) };
        }
    };
    signal_all(libc::SIGTERM);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut status = None;
    while std::time::Instant::now() < deadline {
        if status.is_none()
            && let Ok(Some(s)) = child.try_wait()
        {
            status = Some(exit_code(s));
        }
        let alive = pids[1..].iter().any(|&p| procfs::alive(p));
        if status.is_some() && !alive {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    signal_all(libc::SIGKILL);
    status.unwrap_or_else(|| child.wait().map(exit_code).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_missing_kernel_init_and_self() {
        assert!(check_pid(0).is_err());
        let e = check_pid(u32::MAX - 1).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        // kthreadd is PID 2 on Linux.
        if let Err(e) = check_pid(2) {
            assert!(e.to_string().contains("kernel thread"), "{e}");
        }
        assert!(check_pid(1).unwrap_err().to_string().contains("init"));
        assert!(
            check_pid(std::process::id())
                .unwrap_err()
                .to_string()
                .contains("stallmon itself")
        );
        let mut child = Command::new("sleep").arg("5").spawn().unwrap();
        assert_eq!(check_pid(child.id()).unwrap(), (child.id(), None));
        child.kill().ok();
        child.wait().ok();
    }

    #[test]
    fn a_thread_id_resolves_to_its_process() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: no arguments.
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        // Our own process is refused, but only after the thread id was resolved to it.
        let e = check_pid(tid).unwrap_err().to_string();
        assert!(e.contains("stallmon itself"), "{e}");
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn unknown_command_is_a_clear_error() {
        let e = resolve_program(&OsString::from("no-such-command-xyz")).unwrap_err();
        assert!(e.to_string().contains("cannot start command"), "{e}");
    }
}
