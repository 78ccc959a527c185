//! The workloads' files and constants, and the processes of a run: workloads and bpftrace
//! ([`Proc`]), stallmon ([`Stallmon`], started through `tests::Tracer`, ready when its
//! `--ready-file` is written), and one workload under one [`Variant`] ([`Bench::under`]).
//! Every guard kills its process and the process's descendants when dropped.
use std::{
    collections::VecDeque,
    ffi::OsStr,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use tests::procs::kill_tree;

use super::{Bench, Variant, bpf_stats};

pub const FIO_FILE_MIB: u64 = 256;
pub const CACHE_FILE_MIB: u64 = 16;
pub const JOB_PROCESSES: usize = 64;

/// The 64-process job of the self-cost phase: a parent and 63 forked children, each reading
/// 4 KiB from a cached file every 50 ms; children leave when the parent is gone.
pub const JOB_PY: &str = r#"
import os, random, sys, time
path, n = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDONLY)
blocks = os.fstat(fd).st_size // 4096
root = os.getpid()
for _ in range(n - 1):
    if os.fork() == 0:
        break
rng = random.Random(os.getpid())
while True:
    os.pread(fd, 4096, rng.randrange(blocks) * 4096)
    time.sleep(0.05)
    if os.getpid() != root and os.getppid() != root:
        os._exit(0)
"#;

/// Runs "$@", writes its exit status to $1, then stays (as `sleep`, its output detached) so that
/// the tracer that started it stays loaded until its counters have been read.
pub const HOLD_SH: &str =
    r#"done=$1; shift; "$@"; echo $? > "$done"; exec sleep 1000 >/dev/null 2>&1"#;

/// Creates `path` with `mib` MiB of non-zero data unless it already has that size.
pub fn make_file(path: &Path, mib: u64) -> Result<()> {
    let want = mib << 20;
    if fs::metadata(path).is_ok_and(|m| m.len() == want) {
        return Ok(());
    }
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for w in chunk.as_chunks_mut::<8>().0 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *w = x.to_le_bytes();
        }
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    Ok(())
}

/// The last lines of a process's stderr, for error messages.
#[derive(Clone, Default)]
struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    fn collect(&self, stderr: impl Read + Send + 'static) {
        let t = self.0.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut t) = t.lock() {
                    if t.len() >= 40 {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            }
        });
    }

    fn text(&self) -> String {
        let t = self
            .0
            .lock()
            .map(|t| Vec::from(t.clone()).join("\n"))
            .unwrap_or_default();
        if t.is_empty() {
            "(no stderr)".into()
        } else {
            format!("stderr:\n{t}")
        }
    }
}

/// A workload or bpftrace: killed, with its descendants, when dropped (unless it has been
/// reaped: its PID may belong to someone else by then). It dies with us too (PDEATHSIG).
pub struct Proc {
    child: Child,
    what: String,
    tail: Tail,
    reaped: bool,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, what: &str, stdout: bool) -> Result<Proc> {
        cmd.stdin(Stdio::null())
            .stdout(if stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped());
        // SAFETY: async-signal-safe calls only.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {what} ({cmd:?})"))?;
        let tail = Tail::default();
        tail.collect(child.stderr.take().expect("piped stderr"));
        Ok(Proc {
            child,
            what: what.to_string(),
            tail,
            reaped: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr_tail(&self) -> String {
        self.tail.text()
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let st = self.child.try_wait()?;
        self.reaped |= st.is_some();
        Ok(st)
    }

    /// Waits for the end; kills the tree and fails after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                kill_tree(self.pid());
                let _ = self.child.wait();
                self.reaped = true;
                bail!(
                    "{} did not finish in {timeout:?} (killed): {}",
                    self.what,
                    self.stderr_tail()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `sig`, waits (30 s at most) and requires a clean exit.
    pub fn stop_ok(&mut self, sig: i32) -> Result<()> {
        // SAFETY: signalling our own child, not reaped yet.
        unsafe { libc::kill(self.pid() as i32, sig) };
        let st = self.wait(Duration::from_secs(30))?;
        ensure!(
            st.success(),
            "{} exited with {st}: {}",
            self.what,
            self.stderr_tail()
        );
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.reaped && !matches!(self.child.try_wait(), Ok(Some(_))) {
            kill_tree(self.pid());
            let _ = self.child.wait();
        }
    }
}

/// Runs a command to its end (killed after `timeout`) and returns its stdout; fails on a
/// non-zero exit.
pub fn run_to_end(cmd: &mut Command, what: &str, timeout: Duration) -> Result<String> {
    let mut p = Proc::spawn(cmd, what, true)?;
    let mut out = p.child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    let st = p.wait(timeout)?;
    let stdout = rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    ensure!(st.success(), "{what} failed ({st}): {}", p.stderr_tail());
    Ok(stdout)
}

/// A running `stallmon trace`, ready (its `--ready-file` written; `tests::Tracer` starts it with
/// `$STALLMON_BIN`, the release binary). Dropped, it is killed with the job it started.
pub struct Stallmon {
    tracer: Option<tests::Tracer>,
    pid: u32,
    pub addr: SocketAddr,
}

/// How a stallmon run ended.
pub struct Ended {
    pub status: ExitStatus,
    /// stallmon's stdout: the traced command's own output (no `--json` here).
    pub stdout: String,
    pub stderr: String,
}

impl Stallmon {
    /// `stallmon trace --listen 127.0.0.1:0 --ready-file F --no-gpu [--syscalls] ARGS...`.
    pub fn start(syscalls: bool, args: &[String]) -> Result<Stallmon> {
        Self::start_env(syscalls, args, &[])
    }

    pub fn start_env(syscalls: bool, args: &[String], env: &[(&str, &OsStr)]) -> Result<Stallmon> {
        let mut all = vec!["--no-gpu"];
        if syscalls {
            all.push("--syscalls");
        }
        all.extend(args.iter().map(String::as_str));
        let tracer = tests::Tracer::launch("trace", &all, env)?;
        Ok(Stallmon {
            pid: tracer.pid(),
            addr: tracer.addr,
            tracer: Some(tracer),
        })
    }

    /// Tracing `pid` (a process unrelated to the workload).
    pub fn attach(syscalls: bool, pid: u32) -> Result<Stallmon> {
        Self::start(syscalls, &["--pid".into(), pid.to_string()])
    }

    /// Starting `argv` as its job.
    pub fn job(syscalls: bool, argv: &[String]) -> Result<Stallmon> {
        let mut args = vec!["--".to_string()];
        args.extend(argv.iter().cloned());
        Self::start(syscalls, &args)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The job's processes (stallmon's descendants).
    pub fn descendants(&self) -> Vec<u32> {
        tests::procs::descendants(self.pid)
    }

    /// Exited already?
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.tracer
            .as_mut()
            .and_then(|t| t.child.try_wait().ok().flatten())
    }

    /// Waits for stallmon to end by itself (its job exited); kills it and its job after
    /// `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Result<Ended> {
        let tracer = self.tracer.take().expect("running");
        let fired = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<()>();
        let (pid, f) = (self.pid, fired.clone());
        thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
                f.store(true, Ordering::SeqCst);
                kill_tree(pid);
            }
        });
        let fin = tracer.wait();
        drop(tx);
        let fin = fin?;
        if fired.load(Ordering::SeqCst) {
            bail!(
                "stallmon did not finish in {timeout:?} (killed); stderr:\n{}",
                fin.stderr
            );
        }
        Ok(Ended {
            status: fin.status,
            stdout: fin.stdout,
            stderr: fin.stderr,
        })
    }

    /// SIGINT (stallmon detaches, stops a job it started, prints its summary), then waits.
    pub fn stop(self) -> Result<Ended> {
        // SAFETY: signalling our own child, not reaped yet.
        unsafe { libc::kill(self.pid as i32, libc::SIGINT) };
        self.wait(Duration::from_secs(30))
    }

    /// Stops a stallmon that traces a process it did not start: it must exit 0.
    pub fn stop_ok(self) -> Result<()> {
        let e = self.stop()?;
        ensure!(
            e.status.success(),
            "stallmon exited with {}: {}",
            e.status,
            e.stderr
        );
        Ok(())
    }
}

impl Drop for Stallmon {
    fn drop(&mut self) {
        if let Some(mut t) = self.tracer.take()
            && !matches!(t.child.try_wait(), Ok(Some(_)))
        {
            kill_tree(self.pid);
            // tests::Tracer's own drop reaps it.
        }
    }
}

/// A `sleep`, the unrelated process the untraced variants trace.
pub fn sleeper() -> Result<Proc> {
    Proc::spawn(Command::new("sleep").arg("1000"), "sleep", false)
}

/// Starts bpftrace and waits until `programs` of its programs are attached.
pub fn start_bpftrace(c: &mut Command, programs: usize) -> Result<Proc> {
    let mut p = Proc::spawn(c, "bpftrace", false)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attached = bpf_stats::perf_show()
            .unwrap_or_default()
            .iter()
            .filter(|(pid, _, _)| *pid == p.pid())
            .count();
        if attached >= programs {
            return Ok(p);
        }
        if let Some(st) = p.try_wait()? {
            bail!(
                "bpftrace exited ({st}) before attaching: {}",
                p.stderr_tail()
            );
        }
        if Instant::now() > deadline {
            bail!("bpftrace did not attach in 60 s: {}", p.stderr_tail());
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A tracer running next to a workload that it does not start (untraced variants, the peer).
#[allow(clippy::large_enum_variant)] // one value per round, never moved in a loop
pub enum Beside {
    Stallmon(Stallmon, Proc),
    Peer(Proc),
}

impl Beside {
    /// The tracer's PID (whose descriptors hold its programs).
    pub fn pid(&self) -> u32 {
        match self {
            Beside::Stallmon(s, _) => s.pid(),
            Beside::Peer(p) => p.pid(),
        }
    }

    /// Detaches cleanly (and checks that it did).
    pub fn stop(self) -> Result<()> {
        match self {
            Beside::Stallmon(s, _sleep) => s.stop_ok(),
            Beside::Peer(mut p) => p.stop_ok(libc::SIGINT),
        }
    }
}

impl Bench {
    /// Starts the peer and waits until both of its programs are attached.
    pub fn start_peer(&self) -> Result<Proc> {
        let mut c = Command::new("bpftrace");
        c.arg(&self.bt_script);
        start_bpftrace(&mut c, 2)
    }

    /// Starts the tracer of an untraced variant or the peer (`None` for the others).
    pub fn beside(&self, v: Variant) -> Result<Option<Beside>> {
        Ok(match v.stallmon() {
            Some((syscalls, false)) => {
                let sleep = sleeper()?;
                let s = Stallmon::attach(syscalls, sleep.pid())?;
                Some(Beside::Stallmon(s, sleep))
            }
            _ if v == Variant::Peer => Some(Beside::Peer(self.start_peer()?)),
            _ => None,
        })
    }

    /// Runs `argv` to its end under variant `v` and returns its stdout: alone, as stallmon's
    /// job, or next to a tracer, which is then detached (and must detach cleanly). The
    /// start-up of a tracer is not part of the workload's own measurement.
    pub fn under(&self, v: Variant, argv: &[String], timeout: Duration) -> Result<String> {
        let what = argv.first().map(String::as_str).unwrap_or("workload");
        if let Some((syscalls, true)) = v.stallmon() {
            let e = Stallmon::job(syscalls, argv)?.wait(timeout)?;
            ensure!(
                e.status.success(),
                "stallmon -- {what} exited with {}: {}",
                e.status,
                e.stderr
            );
            return Ok(e.stdout);
        }
        let tracer = self.beside(v)?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        let out = run_to_end(&mut cmd, what, timeout)?;
        if let Some(t) = tracer {
            t.stop()?;
        }
        Ok(out)
    }
}
