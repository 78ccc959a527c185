//! Test support: the harness of stallmon's privileged integration tests, shared with the
//! benchmark (`xtask`): starting stallmon and waiting for its ready file, the bundled workloads,
//! the stand-in GPUs ([`gpu`]), process trees ([`procs`]), a slow disk, Prometheus helpers.
//!
//! The tests load eBPF programs, create cgroups and read `/sys/block`: they need root on a
//! kernel with BTF. They never skip: on a machine that cannot run them, [`require_privileged`]
//! fails the test with the reason (and `cargo xtask test` sets everything up first).
pub mod alerting;
pub mod gpu;
pub mod podresources_standin;
pub mod procs;
pub mod prom;
pub mod scenario;
pub mod zabbix;

use std::{
    ffi::OsStr,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

/// Repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The stallmon binary under test: `$STALLMON_BIN`, else `target/debug/stallmon` (built by
/// `cargo xtask test`).
pub fn stallmon_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("STALLMON_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let p = target.join("debug/stallmon");
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo xtask test` does), or set STALLMON_BIN",
        p.display()
    );
    p
}

/// A bundled workload script.
pub fn workload(name: &str) -> PathBuf {
    repo_root().join("tests/workloads").join(name)
}

/// The real Python interpreter (not a pyenv shim, which would fork helpers of its own and
/// become part of the traced job).
pub fn python() -> PathBuf {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 is required by the workloads");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Creates (or reuses) the dataset of `tests/workloads/loader.py`: `files` files of `kib` KiB of
/// random bytes under `data`.
pub fn loader_dataset(data: &Path, files: u32, kib: u32) {
    let status = Command::new(python())
        .arg(workload("loader.py"))
        .args(["--create", "--report", "/dev/null"])
        .args(["--files", &files.to_string(), "--kib", &kib.to_string()])
        .arg("--data")
        .arg(data)
        .status()
        .expect("running loader.py --create");
    assert!(
        status.success(),
        "creating the dataset under {}",
        data.display()
    );
}

/// Fails the test (never skips) unless this machine can run privileged tracing tests.
pub fn require_privileged() {
    // SAFETY: trivial libc call.
    let euid = unsafe { libc::geteuid() };
    let mut problems = Vec::new();
    if euid != 0 {
        problems.push("not running as root".to_string());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        problems.push("no kernel BTF at /sys/kernel/btf/vmlinux".to_string());
    }
    if !Path::new("/sys/kernel/tracing/events").is_dir() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status();
        if !Path::new("/sys/kernel/tracing/events").is_dir() {
            problems.push("tracefs not mounted at /sys/kernel/tracing".to_string());
        }
    }
    assert!(
        problems.is_empty(),
        "privileged test cannot run here ({}); this is a failure, not a skip: run `cargo xtask test` as root",
        problems.join(", ")
    );
}

/// Whether this run is CI's (`CI=true`): a test that cannot run there fails.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A unique scratch file path (not created).
fn unique_path(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "stallmon-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A running `stallmon trace` or `stallmon node`, ready: its `--ready-file` was written.
pub struct Tracer {
    pub child: Child,
    pub addr: SocketAddr,
    /// The ready document (`schema::ready::Ready` as JSON).
    pub ready: serde_json::Value,
    stderr_rx: mpsc::Receiver<String>,
    pub stderr: Vec<String>,
    /// stdout, drained as it comes (a full pipe would block stallmon's summary).
    stdout: Option<std::thread::JoinHandle<String>>,
    ready_file: PathBuf,
}

impl Tracer {
    /// Starts `stallmon trace --listen 127.0.0.1:0 ARGS...` and waits until it traces.
    pub fn start(args: &[&str]) -> Result<Self> {
        Self::launch("trace", args, &[])
    }

    /// Starts `stallmon SUBCOMMAND --listen 127.0.0.1:0 --ready-file F ARGS...` with extra
    /// environment variables, and waits for the ready file.
    pub fn launch(sub: &str, args: &[&str], env: &[(&str, &OsStr)]) -> Result<Self> {
        let ready_file = unique_path("ready");
        let mut cmd = Command::new(stallmon_bin());
        cmd.arg(sub)
            .args(["--listen", "127.0.0.1:0", "--ready-file"])
            .arg(&ready_file)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("starting stallmon")?;
        let mut out = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut text = String::new();
            use std::io::Read;
            let _ = out.read_to_string(&mut text);
            text
        });
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            while let Ok(l) = rx.try_recv() {
                lines.push(l);
            }
            if let Ok(text) = std::fs::read_to_string(&ready_file)
                && let Ok(ready) = serde_json::from_str::<serde_json::Value>(&text)
            {
                let addr = ready["listen"]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(|| anyhow!("bad ready file: {text}"))?;
                return Ok(Self {
                    child,
                    addr,
                    ready,
                    stderr_rx: rx,
                    stderr: lines,
                    stdout: Some(stdout),
                    ready_file,
                });
            }
            if let Some(status) = child.try_wait()? {
                std::thread::sleep(Duration::from_millis(200));
                while let Ok(l) = rx.try_recv() {
                    lines.push(l);
                }
                bail!(
                    "stallmon exited before it was ready ({status}): {}",
                    lines.join("\n")
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("stallmon was not ready within 60 s: {}", lines.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What stallmon has logged so far (for a failing test's message).
    pub fn log(&mut self) -> String {
        while let Ok(l) = self.stderr_rx.try_recv() {
            self.stderr.push(l);
        }
        self.stderr.join("\n")
    }

    pub fn scrape(&self) -> Result<String> {
        let (code, body) = prom::http_get(self.addr, "/metrics")?;
        if code != 200 {
            bail!("GET /metrics answered {code}");
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// Scrapes until `pred` holds on the exposition (or the deadline passes).
    pub fn scrape_until(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.scrape()?;
            if pred(&text) {
                return Ok(text);
            }
            if Instant::now() > deadline {
                bail!("condition not met within {timeout:?}; last scrape:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends SIGINT (like Ctrl-C) and waits for the summary.
    pub fn stop(self) -> Result<Finished> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.wait()
    }

    /// Waits for stallmon to exit by itself (target exited or --duration).
    pub fn wait(mut self) -> Result<Finished> {
        let status = self.child.wait()?;
        let stdout = self
            .stdout
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        while let Ok(line) = self.stderr_rx.recv_timeout(Duration::from_secs(2)) {
            self.stderr.push(line);
        }
        let _ = std::fs::remove_file(&self.ready_file);
        Ok(Finished {
            status,
            stdout,
            stderr: self.stderr.join("\n"),
        })
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // stallmon and the command it started (a failed test must not leave a job behind).
            procs::kill_tree(self.child.id());
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.ready_file);
    }
}

pub struct Finished {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// The `--json` summary.
    pub fn summary(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.stdout).with_context(|| {
            format!(
                "stdout is not a JSON summary: {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }
}

/// The one job of a `trace` summary.
pub fn job(summary: &serde_json::Value) -> &serde_json::Value {
    &summary["jobs"][0]
}

/// Value of one sample in a Prometheus text exposition (`name{labels}` written exactly as
/// `selector`, or a plain name).
pub fn metric_value(text: &str, selector: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == selector).then(|| value.parse().ok())?
    })
}

/// Sum of every sample of `name` whose labels contain all `labels` (`k="v"` strings).
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|lab| rest.contains(lab)))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A cgroup-v1 blkio group that throttles reads from the root disk: a genuinely slow disk for
/// one process tree. Removed on drop.
pub struct SlowDisk {
    pub dir: PathBuf,
}

/// `major:minor` of the block device holding `path`'s filesystem (the whole disk).
pub fn disk_of(path: &Path) -> Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path)?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    // A partition's "partition" attribute exists; its parent directory is the disk.
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let real = std::fs::canonicalize(&sys)?;
    let disk_dir = if real.join("partition").exists() {
        real.parent().unwrap().to_path_buf()
    } else {
        real
    };
    let devno = std::fs::read_to_string(disk_dir.join("dev"))?;
    let (a, b) = devno
        .trim()
        .split_once(':')
        .ok_or_else(|| anyhow!("bad dev file"))?;
    Ok((a.parse()?, b.parse()?))
}

/// Name of the whole disk holding `path` (e.g. "vda").
pub fn disk_name_of(path: &Path) -> Result<String> {
    let (major, minor) = disk_of(path)?;
    let uevent = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"))?;
    uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no DEVNAME"))
}

impl SlowDisk {
    /// Reads from the disk holding `path` limited to `bytes_per_sec` for processes in the group.
    pub fn new(name: &str, path: &Path, bytes_per_sec: u64) -> Result<Self> {
        let dir = PathBuf::from("/sys/fs/cgroup/blkio").join(name);
        if dir.exists() {
            let _ = std::fs::remove_dir(&dir);
        }
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (major, minor) = disk_of(path)?;
        std::fs::write(
            dir.join("blkio.throttle.read_bps_device"),
            format!("{major}:{minor} {bytes_per_sec}"),
        )?;
        Ok(Self { dir })
    }

    /// Shell prefix that moves the shell into this group before exec'ing the command.
    pub fn wrap(&self, argv: &[String]) -> Vec<String> {
        let mut v = vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            format!(
                "echo $$ > {}/cgroup.procs && exec \"$@\"",
                self.dir.display()
            ),
            "sh".to_string(),
        ];
        v.extend(argv.iter().cloned());
        v
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Drops the page cache so that the next buffered reads hit the disk.
pub fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// A scratch directory under the repository's target dir (on the traced disk, unlike tmpfs).
pub fn scratch_dir(name: &str) -> PathBuf {
    let d = repo_root().join("target/test-data").join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}
